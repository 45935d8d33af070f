//! The emulator's admin HTTP endpoint (hyper 1):
//! - `GET /stats` — counts per entity path (see [`super::EntityStats`]);
//! - `GET /dlq?entity=PATH` — the dead-letter queue of PATH with reasons;
//! - `POST /faults/drop-connections`, `/faults/detach-links`, `/faults/expire-tokens`;
//! - `POST /faults/renew-lock?entity=PATH&fail=N` — the next N `com.microsoft:renew-lock`
//!   requests on PATH (a queue or subscription) answer 410 message-lock-lost, as ASB
//!   does for a lost lock; `fail=all`: every one until `fail=0`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Shared;
use crate::shutdown::Shutdown;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: Shutdown) {
    let mut errors = crate::backoff::AcceptErrors::new("emulator admin");
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => {
                    errors.accepted();
                    s
                }
                Err(e) => {
                    if errors.pause(&e, &mut stop).await {
                        return;
                    }
                    continue;
                }
            },
            _ = stop.recv() => return,
        };
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.recv() => {}
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(s) => reply(StatusCode::OK, "application/json", s),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/stats") => json(&shared.store.stats()),
        (&Method::GET, "/dlq") => match query_param(req.uri().query(), "entity") {
            Some(entity) => json(&shared.store.dead_letters(&entity)),
            None => reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "missing ?entity=PATH\n".into(),
            ),
        },
        (&Method::POST, "/faults/drop-connections") => {
            let n = shared.drop_connections();
            json(&serde_json::json!({ "dropped": n }))
        }
        (&Method::POST, "/faults/detach-links") => {
            let n = shared.detach_links();
            json(&serde_json::json!({ "connections": n }))
        }
        (&Method::POST, "/faults/expire-tokens") => {
            let n = shared.expire_tokens();
            json(&serde_json::json!({ "connections": n }))
        }
        (&Method::POST, "/faults/renew-lock") => {
            let q = req.uri().query();
            let bad = |m: &str| reply(StatusCode::BAD_REQUEST, "text/plain", format!("{m}\n"));
            let Some(entity) = query_param(q, "entity") else {
                return bad("missing ?entity=PATH (a queue or subscription)");
            };
            let fail = query_param(q, "fail").unwrap_or_else(|| "1".into());
            let count = match fail.as_str() {
                "all" => None,
                n => match n.parse::<u32>() {
                    Ok(n) => Some(n),
                    Err(_) => return bad("fail must be a count (0 clears) or 'all'"),
                },
            };
            if !shared.fail_renewals(&entity, count) {
                return reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no queue or subscription '{entity}'\n"),
                );
            }
            json(&serde_json::json!({ "entity": entity, "fail": fail }))
        }
        (_, "/stats" | "/dlq") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        (_, p) if p.starts_with("/faults/") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST on /faults/drop-connections, /faults/detach-links, /faults/expire-tokens or /faults/renew-lock\n"
                .into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try GET /stats\n".into(),
        ),
    }
}
