//! Files the gateway is handed by path (config, secrets, certificates, keys) are read
//! with a cap: each is a few KB, and a path given by mistake (a log, `/dev/zero`, a
//! symlink to either) must be refused, not read into memory.

use std::path::Path;

/// The most such a file may hold: 1 MiB.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Read the whole of `path` if it holds at most `cap` bytes.
///
/// Errors: those of opening and reading the file; and, for a file with more than `cap`
/// bytes (or a device that never ends), one of kind `InvalidData` saying "it holds more
/// than …" — found by reading one byte past `cap`, never more, and what was read is
/// dropped.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        let most = if cap.is_multiple_of(1024) {
            format!("{} KiB", cap / 1024)
        } else {
            format!("{cap} bytes")
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it holds more than {most}"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file over the cap, or a device that never ends, is refused after reading one
    /// byte past the cap; a file of exactly the cap is read.
    #[test]
    fn files_over_the_cap_are_refused_without_reading_them_whole() {
        let e = read_capped(Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("more than 4 KiB"), "{e}");
        let dir = std::env::temp_dir().join(format!("asbgw-capped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, vec![b'a'; 4096]).unwrap();
        assert_eq!(read_capped(&f, 4096).unwrap().len(), 4096);
        let e = read_capped(&f, 4095).unwrap_err();
        assert!(e.to_string().contains("more than 4095 bytes"), "{e}");
        let e = read_capped(Path::new("/dev/zero"), MAX_FILE_BYTES).unwrap_err();
        assert!(e.to_string().contains("more than 1024 KiB"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
