//! Who is voting, and from where: the pure rules behind a vote's identity. A voter is the `sub`
//! of a verified token ([`crate::auth`]), or, when anonymity was chosen on purpose, the id in a
//! cookie this deployment signed, or the `X-Voter-Id` of a gateway that authenticated the voter.
//! A client's address is the right-most `X-Forwarded-For` entry not added by a trusted proxy.
//! A vote posted from another site's page is refused.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use sha2::Sha256;

/// Where voters' identities come from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// The voter is the `sub` of a token signed by a key of the identity provider's key set.
    Jwt(JwtConfig),
    /// No identity provider: voters are ids this deployment issues in a signed cookie, or what a
    /// trusted gateway says in `X-Voter-Id`. For the demo and the original app's page.
    Anonymous(AnonymousVoters),
}

/// Where the identity provider's signing keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS document on disk, read again at every refresh.
    File(PathBuf),
    /// A JWKS URL (`http://` or `https://`, verified against the process's trust), such as an
    /// Auth0 tenant's `/.well-known/jwks.json`.
    Url(String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "{}", p.display()),
            KeySource::Url(u) => f.write_str(u),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub keys: KeySource,
    pub issuer: String,
    pub audience: String,
    /// Allowed clock difference when checking `exp` and `nbf`.
    pub leeway: Duration,
    /// How often the key set is fetched again.
    pub refresh: Duration,
    /// A token naming a key the set does not hold triggers a fetch, at most this often.
    pub unknown_key_refetch: Duration,
    /// Verified tokens remembered, so a voter voting again costs no signature check.
    pub cache_entries: usize,
}

pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(10);
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
pub const DEFAULT_UNKNOWN_KEY_REFETCH: Duration = Duration::from_secs(30);
/// About 100 bytes each: 26 MiB at the default.
pub const DEFAULT_TOKEN_CACHE_ENTRIES: usize = 1 << 18;
/// A cookie secret shorter than this is refused: it signs every anonymous voter's id.
pub const MIN_COOKIE_SECRET_BYTES: usize = 32;

impl JwtConfig {
    pub fn new(keys: KeySource, issuer: String, audience: String) -> Self {
        Self {
            keys,
            issuer,
            audience,
            leeway: DEFAULT_JWT_LEEWAY,
            refresh: DEFAULT_JWKS_REFRESH,
            unknown_key_refetch: DEFAULT_UNKNOWN_KEY_REFETCH,
            cache_entries: DEFAULT_TOKEN_CACHE_ENTRIES,
        }
    }
}

/// Anonymous voters' cookie: `<id>.<signature>`, the signature an HMAC-SHA256 of the id under
/// a secret every ingest of the deployment shares, so a voter cannot mint or alter an id.
#[derive(Clone)]
pub struct AnonymousVoters {
    secret: Vec<u8>,
}

impl std::fmt::Debug for AnonymousVoters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnonymousVoters { secret: *** }")
    }
}

impl AnonymousVoters {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    /// A secret of this process's own: fine for one process, but cookies it signs mean nothing
    /// to another ingest.
    pub fn with_random_secret() -> Self {
        Self::new(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn secret_len(&self) -> usize {
        self.secret.len()
    }

    fn mac(&self, id: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac
    }

    /// The cookie value carrying `id`.
    pub fn sign(&self, id: &str) -> String {
        use base64::Engine as _;
        let tag = self.mac(id).finalize().into_bytes();
        format!(
            "{id}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The id a cookie value carries, if this deployment signed it.
    pub fn verify<'a>(&self, value: &'a str) -> Option<&'a str> {
        use base64::Engine as _;
        let (id, tag) = value.rsplit_once('.')?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()?;
        // Constant time: a forger learns nothing from how long a refusal took.
        self.mac(id).verify_slice(&tag).ok()?;
        Some(id)
    }
}

/// Connections from these networks are gateways and load balancers: only they may say who the
/// voter is (`X-Voter-Id`) or who the client is (`X-Forwarded-For`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Comma-separated CIDRs (`10.0.0.0/16,127.0.0.1/32`); a bare address is one host.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not a CIDR or an address"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An IPv4 address that arrived IPv6-mapped, as its IPv4 self.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer, or behind trusted proxies the right-most
    /// `X-Forwarded-For` entry that is not one of them.
    pub ip: IpAddr,
    /// Did the request reach us from a trusted proxy?
    pub via_trusted_proxy: bool,
}

/// The client behind `peer`. Entries a client put in `X-Forwarded-For` itself are to the left
/// of what its first trusted proxy appended, so walking from the right past the trusted proxies
/// finds the address the outermost trusted proxy saw, whatever the client wrote.
pub fn client(peer: SocketAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> Client {
    let peer_ip = canonical(peer.ip());
    if !trusted.contains(peer_ip) {
        return Client {
            ip: peer_ip,
            via_trusted_proxy: false,
        };
    }
    let mut ip = peer_ip;
    let entries: Vec<&str> = headers
        .get_all(FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        let Some(addr) = parse_forwarded(entry.trim()) else {
            // Unreadable: whatever is left of it was not vouched for by a trusted proxy.
            break;
        };
        ip = addr;
        if !trusted.contains(addr) {
            break;
        }
    }
    Client {
        ip,
        via_trusted_proxy: true,
    }
}

/// An `X-Forwarded-For` entry: an address, maybe with a port, maybe bracketed.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    entry.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Is this a request another site's page made a browser send? A browser names the page's origin
/// in `Origin` on every cross-origin `POST`, and says `Sec-Fetch-Site: cross-site`; a client that
/// is not a browser sends neither, and is not refused for it.
pub fn cross_site(headers: &HeaderMap, allowed_origins: &[String]) -> bool {
    if headers
        .get(SEC_FETCH_SITE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return true;
    }
    let Some(origin) = headers.get(hyper::header::ORIGIN) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return true;
    };
    if allowed_origins
        .iter()
        .any(|a| a.eq_ignore_ascii_case(origin))
    {
        return false;
    }
    // The site itself: the origin's host is the host the request was sent to.
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) => !o.eq_ignore_ascii_case(h),
        // `Origin: null` (a sandboxed or privacy-sensitive context) or no host: not ours.
        _ => true,
    }
}

/// The `Set-Cookie` for an anonymous voter's signed id.
pub fn voter_cookie(name: &str, value: &str, max_age_secs: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{secure}"
    ))
    .expect("ids and signatures are header-safe")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_signed_cookie_verifies_and_any_change_to_it_does_not() {
        let voters = AnonymousVoters::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let value = voters.sign("0a1b2c");
        assert_eq!(voters.verify(&value), Some("0a1b2c"));
        assert_eq!(voters.verify("0a1b2c"), None, "unsigned");
        let (id, tag) = value.rsplit_once('.').unwrap();
        assert_eq!(voters.verify(&format!("0a1b2d.{tag}")), None, "another id");
        assert_eq!(
            voters.verify(&format!("{id}.{}", &tag[1..])),
            None,
            "cut tag"
        );
        let other = AnonymousVoters::new(b"another secret of thirty-two byt".to_vec());
        assert_eq!(other.verify(&value), None, "another deployment's cookie");
    }

    proptest! {
        #[test]
        fn no_altered_cookie_is_trusted(id in "[a-z0-9]{1,40}", flip in 0usize..200, bit in 0u8..8) {
            let voters = AnonymousVoters::new(vec![7u8; 32]);
            let mut value = voters.sign(&id).into_bytes();
            let at = flip % value.len();
            value[at] ^= 1 << bit;
            if let Ok(s) = std::str::from_utf8(&value) {
                // Base64 ignores no bits of the tag's last character here (43 characters carry
                // 258 bits, 2 padding bits that must be zero), so every change is refused.
                prop_assert_eq!(voters.verify(s), None);
            }
        }
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies_and_from_the_right() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1").unwrap();
        let lb: SocketAddr = "10.0.3.4:5000".parse().unwrap();
        let outsider: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        // A client's own X-Forwarded-For is ignored.
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            client(outsider, &h, &trusted),
            Client {
                ip: "203.0.113.9".parse().unwrap(),
                via_trusted_proxy: false
            }
        );
        // Through the load balancer: the entry it appended, whatever the client put before it.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 7.7.7.7, 198.51.100.7")]);
        assert_eq!(
            client(lb, &h, &trusted).ip,
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Two trusted hops, headers split over lines.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "192.168.1.1"),
        ]);
        assert_eq!(
            client(lb, &h, &trusted).ip,
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Nothing forwarded: the proxy itself.
        assert_eq!(client(lb, &HeaderMap::new(), &trusted).ip, lb.ip());
        // An IPv4 peer that arrived IPv6-mapped is still trusted.
        let mapped: SocketAddr = "[::ffff:10.0.3.4]:5000".parse().unwrap();
        assert!(client(mapped, &HeaderMap::new(), &trusted).via_trusted_proxy);
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("nonsense").is_err());
    }

    #[test]
    fn cross_site_posts_are_told_from_same_site_and_non_browser_ones() {
        let allowed = vec!["https://partner.example".to_string()];
        assert!(
            !cross_site(&HeaderMap::new(), &allowed),
            "curl sends no Origin"
        );
        assert!(!cross_site(
            &headers(&[("origin", "https://vote.example"), ("host", "vote.example")]),
            &allowed
        ));
        assert!(cross_site(
            &headers(&[("origin", "https://evil.example"), ("host", "vote.example")]),
            &allowed
        ));
        assert!(!cross_site(
            &headers(&[
                ("origin", "https://partner.example"),
                ("host", "vote.example")
            ]),
            &allowed
        ));
        assert!(cross_site(
            &headers(&[("origin", "null"), ("host", "vote.example")]),
            &allowed
        ));
        assert!(cross_site(
            &headers(&[("sec-fetch-site", "cross-site")]),
            &allowed
        ));
        assert!(!cross_site(
            &headers(&[("sec-fetch-site", "same-origin")]),
            &allowed
        ));
    }
}
