//! The shipped appliance files agree with the code: the example config is valid the way
//! systemd runs it (connection string from the credential), the unit loads the credential
//! the config code reads, and the unit's memory limits cover the default budget.
//! `scripts/ci/appliance.sh` checks the unit itself with systemd-analyze.

use std::path::Path;

use asb_gateway::config::{CREDENTIAL_NAME, Config, LoadEnv};

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

fn mib(v: &str) -> usize {
    v.strip_suffix('M').expect("a size in M").parse().unwrap()
}

#[test]
fn example_config_is_valid_with_the_credential_and_not_without() {
    let text = read("systemd/config.example.toml");
    let dir = std::env::temp_dir().join(format!("asbgw-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(CREDENTIAL_NAME),
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v\n",
    )
    .unwrap();
    let env = LoadEnv {
        credentials_dir: Some(dir.clone()),
        ..LoadEnv::default()
    };
    let c = Config::parse(&text, &env).expect("the example config is valid");
    assert!(asb_gateway::budget::compute(&c).fits());
    assert_eq!(c.connection.port, 5671, "ASB over AMQPS");
    // No secret in the example: without the credential it must not load.
    let e = Config::parse(&text, &LoadEnv::default())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("source.connection_string"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();

    let unit = read("systemd/asb-gateway.service");
    let memory_high = mib(&unit_values(&unit, "MemoryHigh")[0]);
    let memory_max = mib(&unit_values(&unit, "MemoryMax")[0]);
    assert!(
        memory_high >= c.budget.memory_mib,
        "MemoryHigh below budget.memory_mib"
    );
    assert!(memory_max > memory_high);
}

#[test]
fn unit_loads_the_credential_and_runs_the_installed_config() {
    let unit = read("systemd/asb-gateway.service");
    assert_eq!(
        unit_values(&unit, "LoadCredential"),
        vec![format!(
            "{CREDENTIAL_NAME}:/etc/asb-gateway/connection-string"
        )]
    );
    assert_eq!(
        unit_values(&unit, "ExecStart"),
        vec![format!(
            "/usr/bin/asb-gateway run --config {}",
            asb_gateway::config::DEFAULT_PATH
        )]
    );
    assert_eq!(unit_values(&unit, "Type"), vec!["notify"]);
    assert_eq!(unit_values(&unit, "NotifyAccess"), vec!["main"]);
    // Default budget (48 MiB) is what MemoryHigh= is set to.
    let default = Config::parse(
        "[source]\nconnection_string = \"Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=v\"\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n",
        &LoadEnv::default(),
    )
    .unwrap();
    assert_eq!(
        mib(&unit_values(&unit, "MemoryHigh")[0]),
        default.budget.memory_mib
    );
}

#[test]
fn cross_configs_are_identical_and_cover_the_four_targets() {
    let a = read("Cross.toml");
    assert_eq!(
        a,
        read("cross.toml"),
        "Cross.toml and cross.toml must stay identical"
    );
    let cargo = read(".cargo/config.toml");
    for t in [
        "aarch64-unknown-linux-gnu",
        "armv7-unknown-linux-gnueabihf",
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        assert!(a.contains(&format!("[target.{t}]")), "Cross.toml lacks {t}");
        assert!(
            cargo.contains(&format!("[target.{t}]")),
            ".cargo/config.toml lacks {t}"
        );
    }
}
