//! A test certificate authority made with the `openssl` tool: a CA, and one server certificate
//! it signs for 127.0.0.1 and localhost, which every TLS-enabled server here presents.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run;
use crate::redis::which;
use crate::{ServerError, INSTALL_HINT};

const DAYS: &str = "3650";

#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// Creates the CA and the server certificate in `dir`, unless they are there already.
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, ServerError> {
        let ca = Self { dir: dir.into() };
        if ca.cert_file().exists() && ca.key_file().exists() && ca.ca_file().exists() {
            return Ok(ca);
        }
        let openssl = which("openssl").ok_or(ServerError::MissingBinary {
            what: "openssl".into(),
            hint: INSTALL_HINT,
        })?;
        std::fs::create_dir_all(&ca.dir).map_err(ServerError::io(&ca.dir))?;
        let at = |name: &str| ca.dir.join(name);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(Command::new(&openssl)
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(at("ca.key"))
            .arg("-out")
            .arg(ca.ca_file())
            .args(["-days", DAYS, "-subj", "/CN=tally test CA"]))?;
        run(Command::new(&openssl)
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(ca.key_file())
            .arg("-out")
            .arg(at("server.csr"))
            .args(["-subj", "/CN=localhost"]))?;
        let ext = at("server.ext");
        std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
            .map_err(ServerError::io(&ext))?;
        run(Command::new(&openssl)
            .args(["x509", "-req", "-in"])
            .arg(at("server.csr"))
            .arg("-CA")
            .arg(ca.ca_file())
            .arg("-CAkey")
            .arg(at("ca.key"))
            .args(["-CAcreateserial", "-days", DAYS, "-extfile"])
            .arg(&ext)
            .arg("-out")
            .arg(ca.cert_file()))?;
        Ok(ca)
    }

    /// The CA's certificate: what clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server certificate (for 127.0.0.1 and localhost).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
