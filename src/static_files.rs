//! Static files: GeoNature's frontend build, `backend/static` (with `custom/` winning)
//! and `backend/media`, served from disk like Apache's `Alias` with `Options -Indexes`.

use http::request::Parts;
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::config::StaticConfig;

/// Answers a request for a static route.
pub async fn serve(_site: &StaticConfig, _request: &Parts) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full("not found\n"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}
