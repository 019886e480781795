//! Free loopback ports for the servers the development tools start.
//!
//! A port found free here is released before the caller binds it, so
//! another process may take it in between: callers that start a server on
//! it say which port failed (PostgreSQL's start tries another). Where the
//! kernel can choose (`tally serve --resp-addr 127.0.0.1:0`, whose ready
//! line reports the port), callers let it and need nothing from here.

use std::net::TcpListener;

/// The lowest port [`free_loopback_port_run`] considers.
pub const PORT_RUN_LOW: u16 = 20_000;
/// [`free_loopback_port_run`] stays below this: the kernel's ephemeral
/// range starts at 32768 on Linux.
pub const PORT_RUN_HIGH: u16 = 32_000;
/// Runs tried by [`free_loopback_port_run`] before it gives up.
pub const PORT_RUN_ATTEMPTS_MAX: u32 = 200;

/// A loopback port that was free a moment ago, chosen by the kernel.
pub fn free_loopback_port() -> std::io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// `n` distinct free loopback ports, chosen by the kernel: all are held
/// until every one is chosen, then released for the caller to bind.
pub fn free_loopback_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// The first of `n` consecutive free loopback ports (for `tally cluster`,
/// which numbers its nodes' ports from a base), between [`PORT_RUN_LOW`]
/// and [`PORT_RUN_HIGH`].
///
/// Below the ephemeral range on purpose: a fault test's tens of thousands
/// of short-lived client connections leave TIME-WAIT entries on ephemeral
/// ports, and those make binding a port chosen there fail. The search
/// starts at an offset taken from the process id, so that test processes
/// running side by side look in different places.
pub fn free_loopback_port_run(n: u16) -> std::io::Result<u16> {
    let span = PORT_RUN_HIGH - PORT_RUN_LOW;
    if n == 0 || n >= span {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a run of {n} ports does not fit between {PORT_RUN_LOW} and {PORT_RUN_HIGH}"),
        ));
    }
    let mut base = PORT_RUN_LOW + (std::process::id() % u32::from(span - n)) as u16;
    for _ in 0..PORT_RUN_ATTEMPTS_MAX {
        if base + n > PORT_RUN_HIGH {
            base = PORT_RUN_LOW;
        }
        let held: Vec<TcpListener> = (0..n)
            .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return Ok(base);
        }
        base += n;
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "no {n} consecutive free loopback ports between {PORT_RUN_LOW} and {PORT_RUN_HIGH}"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ports handed out at once are distinct, and each can be bound.
    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports = free_loopback_ports(4).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
        TcpListener::bind(("127.0.0.1", free_loopback_port().unwrap())).unwrap();
    }

    // A run lies below the ephemeral range and every port in it is free.
    #[test]
    fn runs_stay_below_the_ephemeral_range() {
        let base = free_loopback_port_run(3).unwrap();
        assert!((PORT_RUN_LOW..=PORT_RUN_HIGH - 3).contains(&base));
        let _held: Vec<_> = (0..3)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)).unwrap())
            .collect();
        assert!(free_loopback_port_run(0).is_err());
    }
}
