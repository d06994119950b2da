//! A deployment to rehearse against, named by a TOML file: per region, its ingest's and
//! reader's base URLs; where voters' tokens come from; and, optionally, the database the
//! rehearsal creates its polls in. `tally local status --target-file` writes one for the local
//! stack, so the path a remote rehearsal takes is the one tested here.
//!
//! ```toml
//! ca_file = "/etc/ssl/tally-ca.pem"            # optional: HTTPS under this CA, not the system's
//!
//! [voters]
//! signing_key = "/secure/rehearsal-key.json"   # a key the identity provider trusts
//! # token_command = "mint-tokens"              # or: reads voter ids, one a line, prints tokens
//!
//! [polls]
//! admin_url = "postgres://tally_migrate@primary/tally"  # optional: creates the run's polls
//! # vote = "rehearsal"; canary = "canary"      # without it: polls made with `tally poll create`
//!
//! [[region]]
//! name = "eu-west-1"
//! ingest = "https://eu-west-1.vote.tally.example"
//! reader = "https://eu-west-1.results.tally.example"
//! ```

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

use crate::freshness::RegionLink;
use crate::load::Bearer;

/// The file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    pub voters: Voters,
    #[serde(default)]
    pub polls: Polls,
    #[serde(rename = "region")]
    pub regions: Vec<RegionUrls>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Voters {
    /// A signing key in `tally idp`'s format that the deployment's identity provider trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// A shell command that reads voter ids, one a line, and prints a token for each, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_command: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Polls {
    /// A PostgreSQL URL allowed to create polls: each run then makes its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_url: Option<String>,
    /// Without `admin_url`: the poll voted in, and the canaries' (options `c0`..`c7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionUrls {
    pub name: String,
    pub ingest: String,
    pub reader: String,
}

/// What the file is wrong about: exit 64, before anything is sent.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot read target file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("target file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// One region, its names resolved.
#[derive(Clone)]
pub struct Region {
    pub name: String,
    pub ingest: RegionLink,
    pub reader: RegionLink,
    /// For messages: the URLs as the file gave them.
    pub ingest_url: String,
    pub reader_url: String,
}

/// A target, checked: every region answered ready before any vote is sent.
pub struct Target {
    pub regions: Vec<Region>,
    pub polls: Polls,
}

impl TargetFile {
    pub fn load(path: &Path) -> Result<Self, TargetError> {
        let text = std::fs::read_to_string(path).map_err(|source| TargetError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |reason: String| TargetError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let file: TargetFile = toml::from_str(&text).map_err(|e| invalid(one_line(&e)))?;
        if file.regions.is_empty() {
            return Err(invalid("no [[region]]".into()));
        }
        let mut names = std::collections::HashSet::new();
        for r in &file.regions {
            model::RegionName::new(&r.name)
                .map_err(|e| invalid(format!("region {:?}: {e}", r.name)))?;
            if !names.insert(&r.name) {
                return Err(invalid(format!("region {} appears twice", r.name)));
            }
            for (role, url) in [("ingest", &r.ingest), ("reader", &r.reader)] {
                parse_url(url).map_err(|e| invalid(format!("{} {role} {url:?}: {e}", r.name)))?;
            }
        }
        match (&file.voters.signing_key, &file.voters.token_command) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "[voters] names both a signing_key and a token_command".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "[voters] names neither a signing_key nor a token_command".into(),
                ))
            }
            _ => {}
        }
        if file.polls.admin_url.is_none()
            && (file.polls.vote.is_none() || file.polls.canary.is_none())
        {
            return Err(invalid(
                "[polls] needs an admin_url to create the run's polls, or both vote and canary"
                    .into(),
            ));
        }
        Ok(file)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# A deployment for `tally load --target` and `tally rehearse --target`.\n{}",
            toml::to_string(self)?
        );
        let mut f = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Loads the file's CA (for HTTPS to the regions only), resolves every region's names and checks every ingest and reader
    /// answers `/readyz` with 200. The first that does not fails the whole target, so no vote
    /// goes anywhere when any region could not be verified.
    pub async fn check(&self) -> anyhow::Result<Target> {
        let trust = tls::ClientTrust::load(self.ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("ca_file: {e}"))?;
        let mut regions = Vec::new();
        for r in &self.regions {
            let ingest = link(&r.name, &r.ingest, &trust).await?;
            let reader = link(&r.name, &r.reader, &trust).await?;
            for (role, l, url) in [
                ("ingest", &ingest, &r.ingest),
                ("reader", &reader, &r.reader),
            ] {
                let status = get(l, "/readyz")
                    .await
                    .map_err(|e| anyhow::anyhow!("{} {role} {url}: {}", r.name, one_line(&*e)))?
                    .0;
                anyhow::ensure!(
                    status == 200,
                    "{} {role} {url}: /readyz answered {status}, not 200",
                    r.name
                );
            }
            regions.push(Region {
                name: r.name.clone(),
                ingest,
                reader,
                ingest_url: r.ingest.clone(),
                reader_url: r.reader.clone(),
            });
        }
        Ok(Target {
            regions,
            polls: self.polls.clone(),
        })
    }

    /// Each voter's `Authorization` header: signed with the file's key as voters need them, or
    /// every one minted up front by the token command (`voters`, one run of it).
    pub fn bearer(&self, voters: &[String]) -> anyhow::Result<Bearer> {
        if let Some(key) = &self.voters.signing_key {
            let key = harness::idp::Issuer::load(key)
                .map_err(|e| anyhow::anyhow!("signing_key: {}", one_line(&*e)))?;
            let tokens = Arc::new(crate::idp::Tokens::new(key));
            return Ok(Arc::new(move |voter| tokens.bearer(voter)));
        }
        let command = self.voters.token_command.as_deref().unwrap_or_default();
        let minted = mint(command, voters)?;
        Ok(Arc::new(move |voter| {
            minted
                .get(voter)
                .cloned()
                .unwrap_or_else(|| Arc::from("Bearer not-minted"))
        }))
    }
}

/// Runs `command` once with every voter id on its standard input; its lines are their tokens.
fn mint(command: &str, voters: &[String]) -> anyhow::Result<HashMap<String, Arc<str>>> {
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("token_command {command:?}"))?;
    let mut stdin = child.stdin.take().context("token_command's stdin")?;
    let ids = voters.join("\n") + "\n";
    let writer = std::thread::spawn(move || stdin.write_all(ids.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    anyhow::ensure!(
        out.status.success(),
        "token_command {command:?} exited with {}",
        out.status
    );
    let text = String::from_utf8(out.stdout).context("token_command printed other than UTF-8")?;
    let tokens: Vec<&str> = text.lines().collect();
    anyhow::ensure!(
        tokens.len() == voters.len(),
        "token_command {command:?} printed {} tokens for {} voters",
        tokens.len(),
        voters.len()
    );
    Ok(voters
        .iter()
        .zip(tokens)
        .map(|(v, t)| (v.clone(), Arc::from(format!("Bearer {}", t.trim()))))
        .collect())
}

/// `scheme://host[:port]` with nothing after it but `/`.
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("not an http:// or https:// URL".into()),
    };
    let host = uri.host().ok_or("no host")?.to_string();
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("a base URL has no path".into());
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port))
}

async fn link(region: &str, url: &str, trust: &tls::ClientTrust) -> anyhow::Result<RegionLink> {
    let (tls, host, port) = parse_url(url).map_err(|e| anyhow::anyhow!("{region} {url}: {e}"))?;
    let addr: SocketAddr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| anyhow::anyhow!("{region} {url}: cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{region} {url}: {host} resolves to no address"))?;
    let default_port = if tls { 443 } else { 80 };
    Ok(RegionLink {
        name: region.to_string(),
        endpoint: bench::load::Endpoint {
            addr,
            tls: tls.then(|| (Arc::from(host.trim_matches(['[', ']'])), trust.clone())),
        },
        authority: if port == default_port {
            host
        } else {
            format!("{host}:{port}")
        },
    })
}

/// `GET path` from a region's server: the status and body.
pub async fn get(link: &RegionLink, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let answer = async {
        let mut sender = bench::load::connect(link.endpoint.clone()).await?;
        let req = hyper::Request::get(path)
            .header("host", &link.authority)
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        anyhow::Ok((status, resp.into_body().collect().await?.to_bytes()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
}

/// An error and its causes on one line.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}

/// The local stack as a target: its regions, its identity provider's key, its primary.
pub fn for_stack(stack: &crate::local::Stack) -> anyhow::Result<TargetFile> {
    let newest = crate::idp::signing_key_file(&stack.idp_dir())?;
    Ok(TargetFile {
        ca_file: None,
        voters: Voters {
            signing_key: Some(newest),
            token_command: None,
        },
        polls: Polls {
            admin_url: Some(stack.primary_url()),
            vote: None,
            canary: None,
        },
        regions: stack
            .regions
            .iter()
            .map(|r| RegionUrls {
                name: r.name.clone(),
                ingest: format!("http://127.0.0.1:{}", r.ingest),
                reader: format!("http://127.0.0.1:{}", r.reader),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<TargetFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target.toml");
        std::fs::write(&path, text).unwrap();
        TargetFile::load(&path).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
[voters]
signing_key = "/k.json"
[polls]
admin_url = "postgres://x@y/tally"
[[region]]
name = "eu-west-1"
ingest = "https://eu-west-1.vote.example"
reader = "http://127.0.0.1:8082/"
"#;

    #[test]
    fn a_good_file_loads_and_round_trips() {
        let f = load(GOOD).unwrap();
        assert_eq!(f.regions[0].name, "eu-west-1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("again.toml");
        f.save(&path).unwrap();
        assert_eq!(
            TargetFile::load(&path).unwrap().regions[0].reader,
            f.regions[0].reader
        );
    }

    #[test]
    fn a_wrong_file_is_refused_with_what_is_wrong() {
        for (text, wanted) in [
            (GOOD.replace("https://eu-west-1", "ftp://eu-west-1"), "not an http:// or https:// URL"),
            (GOOD.replace("8082/", "8082/v1"), "a base URL has no path"),
            (GOOD.replace("signing_key = \"/k.json\"", ""), "neither a signing_key nor a token_command"),
            (GOOD.replace("admin_url = \"postgres://x@y/tally\"", "vote = \"v\""), "needs an admin_url"),
            (GOOD.replace("name = \"eu-west-1\"", "name = \"EU WEST\""), "region \"EU WEST\""),
            (GOOD.replace("[[region]]", "[[regions]]"), "unknown field"),
            (format!("{GOOD}\n[[region]]\nname = \"eu-west-1\"\ningest = \"http://a\"\nreader = \"http://b\"\n"), "appears twice"),
        ] {
            let err = load(&text).unwrap_err();
            assert!(err.contains(wanted), "{err:?} should say {wanted:?}");
        }
    }

    #[test]
    fn a_token_command_mints_every_voter_in_one_run() {
        let ids = vec!["alice".to_string(), "bob".to_string()];
        let minted = mint("sed 's/^/t-/'", &ids).unwrap();
        assert_eq!(&*minted["bob"], "Bearer t-bob");
        let err = mint("head -1", &ids).unwrap_err().to_string();
        assert!(err.contains("printed 1 tokens for 2 voters"), "{err}");
    }
}
