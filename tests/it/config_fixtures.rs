//! Every fixture under tests/fixtures/config/valid parses and fits its budget; every
//! fixture under invalid/ fails with a message naming the key given on its first line
//! (`# expect: KEY`), and no error or Debug output contains the fixture's secret.

use std::path::{Path, PathBuf};

use asb_gateway::budget;
use asb_gateway::config::{Config, LoadEnv};

const SECRET: &str = "SUPERSECRETKEY";

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn valid_fixtures_parse_and_fit() {
    for path in fixtures("valid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &LoadEnv::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let b = budget::compute(&c);
        assert!(b.fits(), "{}: {}", path.display(), b.render());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(SECRET), "{}: secret in Debug", path.display());
    }
}

#[test]
fn invalid_fixtures_name_the_key() {
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be '# expect: KEY'", path.display()))
            .trim()
            .to_string();
        let message = match Config::parse(&text, &LoadEnv::default()) {
            Err(e) => e.to_string(),
            Ok(c) => {
                let b = budget::compute(&c);
                assert!(!b.fits(), "{} was accepted", path.display());
                "budget.memory_mib: worst case exceeds the budget".to_string()
            }
        };
        assert!(
            message.contains(&expect),
            "{}: error {message:?} does not name {expect:?}",
            path.display()
        );
        assert!(
            !message.contains(SECRET),
            "{}: secret in error",
            path.display()
        );
    }
}

#[test]
fn toml_errors_carry_line_and_column() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config/invalid/unknown-key.toml"),
    )
    .unwrap();
    let e = Config::parse(&text, &LoadEnv::default())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("line 8, column 1: journal.evnts"), "{e}");
}

#[test]
fn connection_string_file_is_read() {
    let dir = std::env::temp_dir().join(format!("asbgw-csfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cs");
    std::fs::write(
        &file,
        "Endpoint=sb://10.0.0.1:5999/;SharedAccessKeyName=k;SharedAccessKey=SUPERSECRETKEY\n",
    )
    .unwrap();
    let text = format!(
        "[source]\nconnection_string_file = {:?}\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n",
        file
    );
    let c = Config::parse(&text, &LoadEnv::default()).unwrap();
    assert_eq!(
        (c.connection.host.as_str(), c.connection.port),
        ("10.0.0.1", 5999)
    );
    std::fs::remove_file(&file).unwrap();
    let e = Config::parse(&text, &LoadEnv::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("source.connection_string_file: cannot read"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
