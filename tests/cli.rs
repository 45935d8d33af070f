//! The binary's command line: exit codes 0/1/2 and what it prints.

use std::path::Path;
use std::process::{Command, Output};

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asb-gateway"))
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
