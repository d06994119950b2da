//! Decoding what a client sent, without IO: which route, whether the content type is right, and
//! the option in the body. Property-tested over arbitrary input (the fuzz target of the decoding path).

use std::borrow::Cow;

/// Why a request's bytes are not a vote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("send the vote as Content-Type: {0}")]
    ContentType(&'static str),
    #[error("{0}")]
    Malformed(String),
}

/// The poll of `POST /v1/polls/{poll}/votes`, if that is the route (the id is checked later).
pub fn vote_route(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/polls/")?
        .strip_suffix("/votes")
        .filter(|p| !p.is_empty() && !p.contains('/'))
}

/// Is the media type (parameters ignored) `want`?
pub fn content_type_is(header: Option<&[u8]>, want: &str) -> bool {
    // Clients nearly always send exactly `want`: settle that with one compare.
    if header == Some(want.as_bytes()) {
        return true;
    }
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

#[derive(serde::Deserialize)]
struct VoteBody<'a> {
    /// Borrowed from the body unless it has escapes: no allocation a vote.
    #[serde(borrow)]
    option: Cow<'a, str>,
}

/// The option of a JSON vote, `{"option":"a"}`.
pub fn json_vote(body: &[u8]) -> Result<Cow<'_, str>, DecodeError> {
    // serde fills a struct from an array by position too, which would take `["a"]` as a vote.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(DecodeError::Malformed(
            "expected {\"option\":\"...\"}: the body is not a JSON object".into(),
        ));
    }
    serde_json::from_slice::<VoteBody>(body)
        .map(|v| v.option)
        .map_err(|e| DecodeError::Malformed(format!("expected {{\"option\":\"...\"}}: {e}")))
}

/// The option of the original app's form post, `vote=a`. Option ids never need percent-decoding;
/// anything encoded is passed on as it is and fails validation as an unknown option.
pub fn form_vote(body: &[u8]) -> Result<Cow<'_, str>, DecodeError> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|b| {
            b.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "vote")
        })
        .map(|(_, v)| Cow::Borrowed(v))
        .ok_or_else(|| DecodeError::Malformed("the form needs a vote field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(vote_route("/v1/polls/default/votes"), Some("default"));
        assert_eq!(vote_route("/v1/polls//votes"), None);
        assert_eq!(vote_route("/v1/polls/a/b/votes"), None);
        assert_eq!(vote_route("/v1/polls/default/results"), None);
        assert!(content_type_is(
            Some(b"Application/JSON; charset=utf-8"),
            "application/json"
        ));
        assert!(content_type_is(
            Some(b"application/json"),
            "application/json"
        ));
        assert!(!content_type_is(
            Some(b"application/jsonx"),
            "application/json"
        ));
        assert!(!content_type_is(Some(b"text/plain"), "application/json"));
        assert!(!content_type_is(None, "application/json"));
        assert_eq!(json_vote(br#"{"option":"a","extra":1}"#), Ok("a".into()));
        assert_eq!(json_vote(b" \n{\"option\":\"a\"}"), Ok("a".into()));
        assert!(matches!(
            json_vote(br#"["a"]"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            json_vote(br#"{"option":7}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            json_vote(&[b'['; 10_000]),
            Err(DecodeError::Malformed(_))
        ));
        // Borrowed from the body, unless an escape had to be decoded.
        assert!(matches!(
            json_vote(br#"{"option":"a"}"#),
            Ok(Cow::Borrowed("a"))
        ));
        assert!(matches!(
            json_vote(br#"{"option":"a\"b"}"#),
            Ok(Cow::Owned(o)) if o == "a\"b"
        ));
        assert_eq!(form_vote(b"x=1&vote=b"), Ok("b".into()));
        assert!(form_vote(b"vote").is_err());
        assert!(form_vote(&[0xff, b'=']).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_requests_never_panic(path in ".{0,200}", ct in proptest::collection::vec(any::<u8>(), 0..80),
                                          body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = vote_route(&path);
            let _ = content_type_is(Some(&ct), "application/json");
            let _ = json_vote(&body);
            let _ = form_vote(&body);
        }

        #[test]
        fn any_json_string_option_is_decoded_exactly(option in ".{0,100}") {
            let body = serde_json::to_vec(&serde_json::json!({"option": option})).unwrap();
            prop_assert_eq!(json_vote(&body).map(Cow::into_owned), Ok(option));
        }

        #[test]
        fn the_exact_media_type_matches_as_the_parsed_one_does(ct in "[ -~]{0,40}") {
            let parsed = ct
                .split(';')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
            prop_assert_eq!(content_type_is(Some(ct.as_bytes()), "application/json"), parsed);
        }

        #[test]
        fn vote_routes_round_trip(poll in "[A-Za-z0-9_-]{1,64}") {
            let path = format!("/v1/polls/{poll}/votes");
            prop_assert_eq!(vote_route(&path), Some(poll.as_str()));
        }
    }
}
