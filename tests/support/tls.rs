//! Test certificates made with the `openssl` command in a private directory: a CA, server
//! certificates for 127.0.0.1/localhost signed by it (valid, expired, short-lived), a key
//! that belongs to another certificate and an encrypted key — every case the gateway's
//! TLS checks must tell apart.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run `openssl ARGS` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (scripts/setup/mirror.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA certificate `NAME.pem` and key `NAME.key` (P-256), valid for 2 days.
pub fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=asbgw test CA",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A key `NAME.key` and a signing request `NAME.csr` for `/CN=cn`, and the extensions
/// file `NAME.ext` holding `ext`.
fn request(dir: &Path, name: &str, cn: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
}

/// Sign `NAME.csr` with the CA `ca` for `days` days into `NAME.pem`.
fn sign(dir: &Path, ca: &str, name: &str, days: u32) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                          keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";

/// A server certificate `NAME.pem` (key `NAME.key`) for 127.0.0.1/localhost signed by the
/// CA `ca`, valid for `days` days.
pub fn server_cert(dir: &Path, ca: &str, name: &str, days: u32) -> (PathBuf, PathBuf) {
    request(dir, name, "127.0.0.1", SERVER_EXT);
    sign(dir, ca, name, days)
}

/// A client certificate `NAME.pem` (key `NAME.key`) with common name `cn` (mosquitto's
/// `use_identity_as_username` makes it the user name), signed by the CA `ca` in `dir`.
pub fn client_cert(dir: &Path, ca: &str, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    request(
        dir,
        name,
        cn,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
    sign(dir, ca, name, 2)
}

/// A server certificate `NAME.pem` that expired in 2020 (`openssl ca` sets the dates).
pub fn expired_cert(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    request(dir, name, "127.0.0.1", SERVER_EXT);
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\n\
         default_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n",
    )
    .unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            &format!("{ca}.pem"),
            "-keyfile",
            &format!("{ca}.key"),
            "-in",
            &format!("{name}.csr"),
            "-out",
            &format!("{name}.pem"),
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200201000000Z",
            "-notext",
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// `KEY` encrypted with a passphrase into `OUT` (PKCS#8, `ENCRYPTED PRIVATE KEY`).
pub fn encrypt_key(dir: &Path, key: &Path, out: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            key.to_str().unwrap(),
            "-out",
            out,
            "-passout",
            "pass:secret",
        ],
    );
    dir.join(out)
}

/// The SHA-256 of the certificate's SubjectPublicKeyInfo, base64 (Chromium's
/// `--ignore-certificate-errors-spki-list`).
pub fn spki_sha256(dir: &Path, cert: &Path) -> String {
    let pubkey = Command::new("openssl")
        .current_dir(dir)
        .args(["x509", "-in", cert.to_str().unwrap(), "-pubkey", "-noout"])
        .output()
        .unwrap();
    let der = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "der"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&pubkey.stdout)?;
            c.wait_with_output()
        })
        .unwrap();
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&der.stdout))
}
