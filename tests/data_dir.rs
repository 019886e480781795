//! A node's data directory is its owner's alone: the directories it
//! creates are 0700 and every file in them 0600, whatever the umask.

use std::os::unix::fs::PermissionsExt as _;

use tally::{Config, IncrementOptions, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directories_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a/b/data");
    let node = Node::open(Config::new(&data)).unwrap();
    for i in 0..10 {
        node.increment(&format!("c{i}"), 1, IncrementOptions::default())
            .await
            .unwrap();
    }
    tokio::task::block_in_place(|| {
        node.snapshot().unwrap();
        node.shutdown().unwrap();
    });
    let mut files = 0;
    let mut stack = vec![dir.path().join("a")];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", entry.path().display());
                files += 1;
            }
        }
    }
    assert!(
        files >= 3,
        "{files} files: node id, lock, journal, snapshot"
    );
}
