//! The HTTP API of `pyherd serve`, by concern: calls (`execute`), streaming calls
//! (`stream`), cancelling calls (`calls`), sessions and programs (`sessions`), operations
//! (`admin`, `reload`), the live dashboard (`dashboard`), and the one mapping from errors
//! to status codes (`error`); the accept loop and its limits (`server`, `limits`) and the
//! token (`auth`).

mod admin;
mod auth;
mod calls;
mod dashboard;
mod error;
mod execute;
mod limits;
mod openapi;
mod reload;
mod server;
mod sessions;
mod stream;

pub(crate) use auth::{Token, check_bind};
pub(crate) use server::{Limits, serve};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use pyherd::Pool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Room for the JSON envelope of `/v1/execute` around a body of frame size: a body
/// over `max_frame_bytes + BODY_SLACK` is refused before it is read whole.
const BODY_SLACK: usize = 4096;

/// What every route can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: Pool,
    /// The open streams, bounded by `max_streams`.
    pub(crate) streams: stream::StreamLimit,
}

pub(crate) use stream::DEFAULT_MAX_STREAMS;

/// Every route of the API with its documentation. A route is added here, and only here,
/// with `.routes(routes!(handler, …))` (one path, its methods' handlers), each handler
/// annotated with `#[utoipa::path]`: it is then served and in `/openapi.json` alike.
pub(crate) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(execute::execute))
        .routes(routes!(stream::stream))
        .routes(routes!(calls::cancel))
        .routes(routes!(sessions::create, sessions::list))
        .routes(routes!(sessions::get, sessions::patch, sessions::delete))
        .routes(routes!(sessions::execute))
        .routes(routes!(stream::session_stream))
        .routes(routes!(
            sessions::get_program,
            sessions::put_program,
            sessions::delete_program
        ))
        .routes(routes!(sessions::list_globals))
        .routes(routes!(
            sessions::get_global,
            sessions::put_global,
            sessions::delete_global
        ))
        .routes(routes!(admin::stats))
        .routes(routes!(admin::workers))
        .routes(routes!(reload::reload))
        .routes(routes!(admin::healthz))
        .routes(routes!(admin::readyz))
        .routes(routes!(admin::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(dashboard::page))
        .routes(routes!(dashboard::timeline))
}

/// The API over `pool`: the routes of [`api`], the answers for unknown routes and
/// methods, the body limit; at most `max_streams` streams are open at once.
pub(crate) fn router(pool: Pool, max_streams: usize) -> Router {
    let body_limit = pool.config().max_frame_bytes + BODY_SLACK;
    let (routes, _) = api().split_for_parts();
    routes
        .fallback(admin::not_found)
        .method_not_allowed_fallback(admin::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(AppState {
            pool,
            streams: stream::StreamLimit::new(max_streams),
        })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use axum::routing::get;
    use utoipa::openapi::OpenApi;

    type Routes = BTreeMap<String, BTreeSet<String>>;

    /// The paths a router serves and their methods (HEAD aside), read from its `Debug`
    /// form, its only listing: `RouteId(n): "/path"` and `RouteId(n): MethodRouter(…
    /// allow_header: Bytes(b"GET,HEAD") …)`, before the fallback router's own.
    fn served<S>(router: &axum::Router<S>) -> Routes {
        let text = format!("{router:?}");
        let main = text.split(", fallback_router:").next().unwrap_or_default();
        let (mut paths, mut methods) = (BTreeMap::new(), BTreeMap::new());
        for part in main.split("RouteId(").skip(1) {
            let Some((id, rest)) = part.split_once("): ") else {
                continue;
            };
            if let Some(path) = rest.strip_prefix('"') {
                paths.insert(id, path.split('"').next().unwrap_or_default().to_owned());
            } else if let Some((_, allow)) = rest.split_once("allow_header: Bytes(b\"") {
                let allow = allow.split('"').next().unwrap_or_default();
                let set = allow.split(',').filter(|m| *m != "HEAD").map(str::to_owned);
                methods.insert(id, set.collect::<BTreeSet<_>>());
            }
        }
        paths
            .into_iter()
            .map(|(id, path)| (path, methods.remove(id).unwrap_or_default()))
            .collect()
    }

    fn documented(doc: &OpenApi) -> Routes {
        let doc = serde_json::to_value(doc).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        paths
            .iter()
            .map(|(path, item)| {
                let methods = item.as_object().unwrap().keys();
                (path.clone(), methods.map(|m| m.to_uppercase()).collect())
            })
            .collect()
    }

    #[test]
    fn every_served_route_is_documented_and_every_documented_one_served() {
        let (router, doc) = super::api().split_for_parts();
        let routes = served(&router);
        let both = BTreeSet::from(["GET".into(), "POST".into()]);
        assert_eq!(routes["/v1/sessions"], both);
        assert_eq!(routes, documented(&doc));
        let (router, doc) = super::api()
            .route("/v1/hidden", get(|| async { "" }))
            .split_for_parts();
        assert_ne!(served(&router), documented(&doc));
    }
}
