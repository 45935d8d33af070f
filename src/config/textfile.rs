//! Reading the text files users hand the gateway (config TOML, secret files, the
//! emulator's Config.json). Editors on Windows (Notepad, Visual Studio, PowerShell's
//! `Out-File`) save with a byte-order mark, and the UTF-8 BOM is invisible in most
//! editors: a file that looks right must not be refused for it. A leading UTF-8 BOM is
//! dropped, and a file that starts with a UTF-16 BOM is decoded as UTF-16.

use std::path::Path;

use crate::file_limit::{MAX_FILE_BYTES, read_capped};
use crate::redact::shown_path;

/// The UTF-8 encoding of U+FEFF.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// `s` without one leading byte-order mark (U+FEFF).
pub fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

/// Decode file bytes: UTF-8 with or without a BOM, or UTF-16 (LE or BE) with its BOM.
/// The BOM is not part of the result.
pub fn decode_text(bytes: &[u8]) -> Result<String, String> {
    if let Some(rest) = bytes.strip_prefix(UTF8_BOM) {
        return utf8(rest);
    }
    let utf16 = |rest: &[u8], from: fn([u8; 2]) -> u16| {
        if !rest.len().is_multiple_of(2) {
            return Err("is not valid UTF-16 (odd length after its byte-order mark)".to_string());
        }
        let units: Vec<u16> = rest.chunks_exact(2).map(|c| from([c[0], c[1]])).collect();
        String::from_utf16(&units).map_err(|_| "is not valid UTF-16".to_string())
    };
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return utf16(rest, u16::from_le_bytes);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return utf16(rest, u16::from_be_bytes);
    }
    utf8(bytes)
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        format!(
            "is not valid UTF-8 (byte {} of the file)",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Read a text file of at most [`MAX_FILE_BYTES`], accepting a leading byte-order mark
/// (see [`decode_text`]). The error names the path (as [`shown_path`] shows it) and the
/// reason, never the content.
pub fn read_text_file(path: &Path) -> Result<String, String> {
    let bytes = read_capped(path, MAX_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", shown_path(path)))?;
    decode_text(&bytes).map_err(|why| format!("{} {why}", shown_path(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boms_are_dropped_and_utf16_is_decoded() {
        let cases: [(&[u8], &str); 6] = [
            (b"a = 1\n", "a = 1\n"),
            (b"\xEF\xBB\xBFa = 1\n", "a = 1\n"),
            // only one BOM is a BOM; a second is content
            (b"\xEF\xBB\xBF\xEF\xBB\xBFx", "\u{feff}x"),
            (b"\xFF\xFEa\x00=\x00\xe9\x00", "a=\u{e9}"),
            (b"\xFE\xFF\x00a\x00=\x00\xe9", "a=\u{e9}"),
            (b"", ""),
        ];
        for (bytes, text) in cases {
            assert_eq!(decode_text(bytes).as_deref(), Ok(text), "{bytes:?}");
        }
        assert!(decode_text(b"\xFF\xFEa").is_err());
        assert!(decode_text(b"\xC3(").unwrap_err().contains("UTF-8"));
        assert_eq!(strip_bom("\u{feff}x"), "x");
        assert_eq!(strip_bom("x\u{feff}"), "x\u{feff}");
    }
}
