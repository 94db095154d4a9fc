//! axum's JSON, query and path extractors, with their rejections as problem+json.

use axum::{
    Json,
    extract::{
        FromRequest, FromRequestParts, Path, Query, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// `Json<T>` whose rejections are problems: 400 `malformed-json` for a body that is not JSON,
/// 400 `invalid-payment` for JSON of the wrong shape, 415 without a JSON content type. All are
/// answered before any side effect, so none is stored by the idempotency layer: the client can
/// fix its request and reuse its key.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    // `body_text` is serde_json's message, such as "amount: invalid type: string \"1\",
    // expected i64 at line 1 column 14"; it names the field, never more than the caller sent.
    let detail = rejection.body_text();
    let problem = match rejection {
        JsonRejection::JsonDataError(_) => Problem::invalid_payment(detail),
        JsonRejection::JsonSyntaxError(_) => Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "The body is not valid JSON",
            detail,
        ),
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as `Content-Type: application/json`",
        ),
        _ => Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "The body could not be read",
            detail,
        ),
    };
    problem.not_stored()
}

/// `Query<T>` whose rejection is a 400 `invalid-query` problem.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection: QueryRejection| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-query",
                    "The query string is not valid",
                    rejection.body_text(),
                )
            })
    }
}

/// `Path<T>` whose rejection is a 404 problem (a path that does not parse names no resource).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|rejection: PathRejection| {
                Problem::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "Not found",
                    rejection.body_text(),
                )
            })
    }
}
