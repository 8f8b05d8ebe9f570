//! A client for the control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::types::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path} (is `tandem run` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to {path}")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected response from {path}: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("no answer from {path} within {after:?}")]
    Timeout { path: PathBuf, after: Duration },
}

/// One request per connection: the API is low-rate, and this keeps the
/// client free of connection state.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_owned(),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            path: self.socket.clone(),
            detail: e.to_string(),
        })?;
        self.call(Method::PUT, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, self.call_inner(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout {
                path: self.socket.clone(),
                after: self.timeout,
            })?
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let http = |source| ClientError::Http {
            path: self.socket.clone(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tandem")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode {
                path: self.socket.clone(),
                detail: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            path: self.socket.clone(),
            detail: e.to_string(),
        })
    }
}
