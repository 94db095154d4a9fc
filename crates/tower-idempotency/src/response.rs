//! Turning a handler's response into a stored one, and a stored one into a replay.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header, response::Parts};
use tower_idempotency_core::StoredResponse;

use crate::body::ResponseBody;

/// The `Idempotent-Replayed` header name: `Idempotent-Replayed: true` marks every replay, as
/// Stripe does.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The `Idempotent-Replay-Body` header name: `Idempotent-Replay-Body: omitted` marks a replay
/// whose body was over the store limit.
pub const IDEMPOTENT_REPLAY_BODY: HeaderName = HeaderName::from_static("idempotent-replay-body");

/// Headers that belong to one connection or one message, never to a stored representation
/// (RFC 9110 section 7.6.1), and the ones the layer never replays.
const NEVER_STORED: [HeaderName; 11] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::DATE,
    header::SET_COOKIE,
];

/// The headers to store from `parts`: all but hop-by-hop headers (those above and any named in
/// `Connection`), `Date`, `Set-Cookie`, `Content-Length` (the replayed body sets its own) and
/// `deny`. Every value of a repeated header is kept, in order.
pub(crate) fn stored_headers(headers: &HeaderMap, deny: &[HeaderName]) -> HeaderMap {
    let named_by_connection: Vec<&[u8]> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .collect();
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let dropped = NEVER_STORED.contains(name)
            || name == header::CONTENT_LENGTH
            || deny.contains(name)
            || named_by_connection
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()));
        if !dropped {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

pub(crate) fn to_stored(
    parts: &Parts,
    body: Bytes,
    omitted: bool,
    deny: &[HeaderName],
) -> StoredResponse {
    StoredResponse {
        status: parts.status,
        headers: stored_headers(&parts.headers, deny),
        body,
        body_omitted: omitted,
    }
}

/// Headers that describe a representation's body (RFC 9110 section 8, RFC 9530), and so are
/// false on the empty body of a replay whose body was omitted.
const DESCRIBES_THE_BODY: [&str; 11] = [
    "content-type",
    "content-encoding",
    "content-language",
    "content-length",
    "content-range",
    "content-md5",
    "etag",
    "last-modified",
    "digest",
    "content-digest",
    "repr-digest",
];

/// The replay of `stored`, marked `Idempotent-Replayed: true`. Without its body (omitted), it
/// also goes without the headers that describe that body.
pub(crate) fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full(stored.body));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    let headers = response.headers_mut();
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if stored.body_omitted {
        for name in DESCRIBES_THE_BODY {
            headers.remove(name);
        }
        headers.insert(IDEMPOTENT_REPLAY_BODY, HeaderValue::from_static("omitted"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_connection_named_headers_keeps_order() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Trace"),
        );
        h.append("x-trace", HeaderValue::from_static("1"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        h.append(header::DATE, HeaderValue::from_static("now"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append(header::LINK, HeaderValue::from_static("<b>"));
        h.append(header::LINK, HeaderValue::from_static("<a>"));
        h.append("x-secret", HeaderValue::from_static("s"));
        h.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let kept = stored_headers(&h, &[HeaderName::from_static("x-secret")]);
        let names: Vec<_> = kept
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                ("link", "<b>"),
                ("link", "<a>"),
                ("content-type", "application/json")
            ]
        );
    }
}
