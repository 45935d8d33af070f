//! Values from the config as errors show them, without showing a secret (DESIGN §4:
//! secrets never appear in logs, errors or Debug output).
//!
//! A key that names a file (`connection_string_file`, `mqtt.password_file`,
//! `panels.tls_key`, …) may be given the secret itself by mistake: a password, a
//! connection string, a PEM key. Errors about such a key show the path only when it
//! looks like one.

use std::borrow::Cow;
use std::path::Path;

/// What errors show instead of a value that does not look like a file path.
pub const HIDDEN_PATH: &str = "the file given (path not shown: it is not absolute, or holds \
     `=`, `;` or control characters, as a secret pasted there would)";

/// `p` as an error shows it: an absolute path without `=`, `;` or control characters as
/// it is, anything else as [`HIDDEN_PATH`].
pub fn shown_path(p: &Path) -> Cow<'_, str> {
    let s = p.to_string_lossy();
    let plausible =
        s.starts_with('/') && !s.chars().any(|c| c.is_control() || c == '=' || c == ';');
    if plausible {
        s
    } else {
        Cow::Borrowed(HIDDEN_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_shown_and_pasted_secrets_are_not() {
        for p in ["/etc/asb-gateway/cs", "/run/credentials/x y/pw.txt"] {
            assert_eq!(shown_path(Path::new(p)), p);
        }
        for secret in [
            "hunter2",
            "Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=SECRET",
            "/x;SharedAccessKey=SECRET",
            "-----BEGIN PRIVATE KEY-----\nMIIE",
            "/a\nSECRET",
            "",
        ] {
            assert_eq!(shown_path(Path::new(secret)), HIDDEN_PATH, "{secret:?}");
        }
    }
}
