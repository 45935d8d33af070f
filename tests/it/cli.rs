//! The binary's command line: exit codes 0/1/2 and what it prints.

use std::path::Path;
use std::process::{Command, Output};

fn bin(args: &[&str]) -> Output {
    Command::new(crate::support::EXE)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let o = bin(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        text(&o.stdout).trim(),
        format!("asb-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let o = bin(&["--help"]);
    assert!(o.status.success());
    for cmd in ["run", "check-config", "demo", "emulator"] {
        assert!(text(&o.stdout).contains(cmd));
    }
}

#[test]
fn bad_usage_exits_1() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["run", "--bogus"],
        &["demo", "--rate", "x"],
    ] {
        let o = bin(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(!o.stderr.is_empty());
    }
}

#[test]
fn check_config_prints_the_budget() {
    let o = bin(&[
        "check-config",
        "--config",
        "tests/fixtures/config/valid/full.toml",
    ]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    for line in [
        "journal frames",
        "panel sessions",
        "mqtt in-flight",
        "total",
        "ok",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
    assert!(!out.contains("SUPERSECRETKEY"));
}

#[test]
fn check_config_warns_when_events_can_exceed_the_brokers_packet_limit() {
    let dir = std::env::temp_dir().join(format!("asbgw-cli-mps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = |limit: usize| {
        format!(
            "[source]\nconnection_string = \"Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=K;SharedAccessKey=V;UseDevelopmentEmulator=true\"\n\
             [[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n\
             [journal]\nmax_event_bytes = 4096\n[mqtt]\nmax_packet_size = {limit}\n"
        )
    };
    for (limit, warned) in [(2048, true), (65536, false)] {
        let path = dir.join(format!("c{limit}.toml"));
        std::fs::write(&path, cfg(limit)).unwrap();
        let o = bin(&["check-config", "--config", path.to_str().unwrap()]);
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
        assert_eq!(
            out.contains("can exceed mqtt.max_packet_size (2048)"),
            warned,
            "{limit}: {out}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_rejects_every_invalid_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/invalid");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read_to_string(&path).unwrap();
        let key = body
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# expect: ");
        let o = bin(&["check-config", "--config", path.to_str().unwrap()]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert!(err.contains(key), "{}: {err}", path.display());
        assert!(!err.contains("SUPERSECRETKEY") && !text(&o.stdout).contains("SUPERSECRETKEY"));
    }
}

#[test]
fn missing_config_file_exits_1() {
    let o = bin(&["check-config", "--config", "/nonexistent/asb.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("cannot read /nonexistent/asb.toml"));
}

#[test]
fn run_refuses_over_budget() {
    let o = bin(&[
        "run",
        "--config",
        "tests/fixtures/config/invalid/over-budget.toml",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("budget.memory_mib"));
}
