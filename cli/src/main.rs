//! The `tally` binary: parses flags and hands over to the library.

mod args;
mod client;
mod serve;
mod settings;
mod signals;

use std::process::ExitCode;

use args::{Cli, Command};
use clap::FromArgMatches;

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&args::command().get_matches()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Cluster(args) => cluster(*args),
        Command::Chaos(args) => chaos(*args),
        Command::Inspect { data_dir, json } => inspect(&data_dir, json),
        Command::Status {
            target,
            haproxy_socket,
            json,
        } => client::status(&target, haproxy_socket.as_deref(), json).map(|()| ExitCode::SUCCESS),
        Command::Node(args::NodeCommand::Retire { id, target, force }) => {
            client::retire(&target, &id, force).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tally: {}", settings::render_error(&e));
            ExitCode::FAILURE
        }
    }
}

fn serve(args: crate::args::ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = args.resolve()?;
    crate::serve::init_logging(settings.log_json, &settings.log_filter)?;
    let runtime = tally::engine::journal::runtime_builder().build()?;
    runtime.block_on(crate::serve::run(settings, None))?;
    Ok(ExitCode::SUCCESS)
}

fn cluster(args: crate::args::ClusterArgs) -> anyhow::Result<ExitCode> {
    crate::serve::init_logging(false, "info")?;
    let haproxy = !args.no_haproxy;
    // Bound before any node starts: a taken port fails at once.
    let token = tally_lab::control::new_token()?;
    let control = if args.no_control {
        None
    } else {
        Some(
            tally_lab::control::ControlServer::bind(args.control_addr, token.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "control endpoint {}: {e} (choose another with --control-addr, or --no-control)",
                    args.control_addr
                )
            })?,
        )
    };
    // Signals are caught from before the first node starts: a Ctrl-C while
    // starting must stop what has started, not leave it running.
    let signals = signals::BlockingSignals::install()?;
    let mut config = args.config();
    let ha = if config.store.as_deref() == Some(tally_lab::chaos::PRIVATE_HA_POSTGRES) {
        let dir = std::path::absolute(config.base_dir.join("ha"))?;
        println!("starting a highly available store in {}", dir.display());
        let ha = tally_lab::hastore::HaStore::start(tally_lab::hastore::HaOptions::new(dir))?;
        let url = ha
            .store_url_haproxy()
            .unwrap_or_else(|| ha.store_url_multi_host());
        println!("store (Patroni primary through HAProxy)  {url}");
        println!("store (every member)  {}", ha.store_url_multi_host());
        config.store = Some(url);
        Some(ha)
    } else {
        None
    };
    let base_dir = config.base_dir.clone();
    let mut cluster = match tally_lab::launcher::LocalCluster::start(config) {
        Ok(cluster) => cluster,
        Err(e) => {
            if let Some(ha) = &ha {
                let _ = ha.shutdown();
            }
            return Err(e.into());
        }
    };
    let (http, redis) = match cluster.secrets() {
        Some(_) => ("https", "rediss"),
        None => ("http", "redis"),
    };
    if haproxy {
        println!("load balancer (HAProxy):");
        println!("  HTTP  {http}://{}", cluster.lb_http());
        println!("  RESP  {redis}://{}", cluster.lb_resp());
        println!("  cluster view  {http}://{}/v1/cluster", cluster.lb_http());
        if let Some(p) = cluster.haproxy_config_path() {
            println!("  configuration {}", p.display());
        }
        if let Some(pid) = cluster.haproxy_pid() {
            println!("  pid {pid}");
        }
        if let Some(socket) = cluster.haproxy_stats_socket() {
            println!(
                "  its view: tally status --url {http}://{} --haproxy-socket {}",
                cluster.lb_http(),
                socket.display()
            );
        }
    }
    println!("nodes:");
    for n in cluster.nodes() {
        println!(
            "  {}  RESP {redis}://{}  HTTP {http}://{}  pid {}  data {}",
            n.node_id,
            n.resp,
            n.http,
            n.pid.map_or("-".into(), |p| p.to_string()),
            n.data_dir.display()
        );
    }
    if !haproxy {
        let first = &cluster.nodes()[0];
        println!("cluster view  {http}://{}/v1/cluster", first.http);
    }
    if let Some(secrets) = cluster.secrets() {
        let ca = secrets.ca();
        let users = secrets.users();
        println!("secured: TLS only, every client authenticates");
        println!("  CA certificate  {}", ca.display());
        println!(
            "  users (NAME ROLE SECRET)  {}  (admin, app: write, reader: read, healthcheck)",
            users.display()
        );
        println!(
            "  redis-cli --tls --cacert {} -p {} --user app --pass \"$(awk '$1==\"app\"{{print $3}}' {})\" PING",
            ca.display(),
            cluster.lb_resp().port(),
            users.display()
        );
        println!(
            "  curl --cacert {} -H \"Authorization: Bearer app:$(awk '$1==\"app\"{{print $3}}' {})\" https://{}/v1/cluster",
            ca.display(),
            users.display(),
            cluster.lb_http()
        );
    }
    if let Some(c) = &control {
        let token_file = tally_lab::control::write_token(&base_dir, &token)?;
        println!(
            "control endpoint  http://{}  (tally chaos --attach {} --control-token-file {})",
            c.local_addr()?,
            c.local_addr()?,
            token_file.display()
        );
    }
    println!("Ctrl-C stops the cluster.");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        if let Some(c) = &control {
            let (cluster, stop) = (&cluster, &stop);
            s.spawn(move || c.serve(cluster, stop));
        }
        signals.wait();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    tracing::info!("stopping the cluster");
    cluster.shutdown();
    if let Some(ha) = ha {
        ha.shutdown()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn chaos(args: crate::args::ChaosArgs) -> anyhow::Result<ExitCode> {
    use tally_lab::chaos::{ChaosConfig, CommandStoreControl, Fault, StoreControl};
    if args.duration.is_zero() {
        anyhow::bail!("--duration must be longer than zero");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let store_control: Option<std::sync::Arc<dyn StoreControl>> =
        match (args.store_stop_cmd, args.store_start_cmd) {
            (Some(stop), Some(start)) => {
                Some(std::sync::Arc::new(CommandStoreControl { stop, start }))
            }
            _ => None,
        };
    // Ctrl-C (or SIGTERM) ends the load early; the run still checks what
    // happened and stops every process it started. Signals are caught from
    // before the cluster starts.
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let signals = signals::BlockingSignals::install()?;
        let flag = interrupt.clone();
        std::thread::Builder::new()
            .name("chaos-signals".into())
            .spawn(move || {
                signals.wait();
                println!(
                    "chaos: interrupted: ending the load, then checking and stopping the cluster"
                );
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            })?;
    }
    let config = ChaosConfig {
        duration: args.duration,
        store: args.store,
        seed,
        clients: args.clients,
        exe: None,
        base_dir: args.dir,
        store_control,
        ha_store: None,
        attach: args.attach,
        secure: args.secure,
        attach_token: match args.attach {
            Some(_) => tally_lab::control::read_token(&args.control_token_file).map_err(|e| {
                anyhow::anyhow!(
                    "reading the control token {}: {e} (tally cluster writes it to \
                     DIR/{}; give --control-token-file)",
                    args.control_token_file.display(),
                    tally_lab::control::CONTROL_TOKEN_FILE
                )
            })?,
            None => String::new(),
        },
        faults: args.faults,
        mislabel_memory_as_local: false,
        interrupt: Some(interrupt),
    };
    let required = tally_lab::chaos::required_faults(&config);
    if config.faults.contains(&Fault::StoreOutage) && !required.contains(&Fault::StoreOutage) {
        println!(
            "chaos: the store fault is not injected: give --store-stop-cmd and --store-start-cmd, \
             or --store private-postgres"
        );
    }
    let ha_left_out: Vec<&str> = config
        .faults
        .iter()
        .filter(|f| f.on_ha_store() && !required.contains(f))
        .map(|f| f.name())
        .collect();
    if !ha_left_out.is_empty() {
        println!(
            "chaos: {} not injected: they need --store private-ha-postgres",
            ha_left_out.join(", ")
        );
    }
    let report = tally_lab::chaos::run(config)?;
    print!("{}", report.render());
    if let Some(path) = &args.report_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inspect(data_dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = tally::inspect::inspect(data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
