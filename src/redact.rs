//! Values from the config as errors show them, without showing a secret (DESIGN §4:
//! secrets never appear in logs, errors or Debug output).
//!
//! A key that names a file (`connection_string_file`, `mqtt.password_file`,
//! `panels.tls_key`, …) may be given the secret itself by mistake: a password, a
//! connection string, a PEM key. Errors about such a key show the path only when it
//! looks like one.
//!
//! Text a peer sent (a broker's error description, a token service's challenge, a
//! browser's `Origin`) is shown through [`peer_text`]: bounded, and one line. Text the
//! user wrote (a config key, a command-line value) is shown through [`escaped`].

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

/// Most characters of a peer's text that logs, errors and `/healthz` show.
pub const PEER_TEXT_MAX: usize = 200;

/// Text from a peer as logs and errors show it: control characters (line breaks
/// included) as `?`, cut to [`PEER_TEXT_MAX`] characters with `…` marking the cut. A
/// peer can make its text as long as its frame; a log line should not be.
pub fn peer_text(s: &str) -> Cow<'_, str> {
    if s.chars().count() <= PEER_TEXT_MAX && !s.contains(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out: String = s
        .chars()
        .take(PEER_TEXT_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(PEER_TEXT_MAX).is_some() {
        out.push('…');
    }
    Cow::Owned(out)
}

/// Text from the user's own file or command line (a config key, an option's value) as
/// errors show it: each control character written as an escape (`\u{1b}`, `\0`, `\n`),
/// so that ESC or NUL never reaches a terminal or a log line as it is. Not cut: the user
/// wrote it.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if !s.contains(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path the user gave (on the command line, in the config) as messages show it:
/// through [`escaped`]. Unlike [`shown_path`] it is always shown: it names no secret.
pub fn escaped_path(p: &Path) -> String {
    escaped(&p.to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_writes_control_characters_as_escapes() {
        assert_eq!(escaped("journal.events"), "journal.events");
        assert_eq!(escaped("a\u{1b}[31m\0\nb"), "a\\u{1b}[31m\\0\\nb");
        assert_eq!(
            escaped_path(Path::new("/etc/x\u{1b}.toml")),
            "/etc/x\\u{1b}.toml"
        );
    }

    #[test]
    fn peer_text_is_one_bounded_line() {
        assert_eq!(peer_text("lock lost"), "lock lost");
        assert_eq!(peer_text("a\r\nb\u{1b}[31m"), "a??b?[31m");
        let long = "x".repeat(10_000);
        let shown = peer_text(&long);
        assert_eq!(shown.chars().count(), PEER_TEXT_MAX + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(
            peer_text(&"é".repeat(PEER_TEXT_MAX)).chars().count(),
            PEER_TEXT_MAX
        );
    }

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
