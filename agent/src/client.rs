//! The client of the local API, for `blobstage pull`, `ls` and `status`: one HTTP/1.1 request
//! per connection over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the daemon at {}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon broke off the request")]
    Http(#[from] hyper::Error),
    #[error("the daemon answered {status} without a JSON body")]
    Garbled { status: u16 },
    /// The daemon's own error: its code and message.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

impl ClientError {
    pub fn code(&self) -> &str {
        match self {
            ClientError::Unreachable { .. } => "daemon_unavailable",
            ClientError::Http(_) | ClientError::Garbled { .. } => "daemon_error",
            ClientError::Api { code, .. } => code,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// Sends one request; a 2xx answer's JSON body is the result, any other status an error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON serializes")));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "blobstage")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .expect("a valid request");
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|_| ClientError::Garbled { status })?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let error = &value["error"];
        Err(ClientError::Api {
            status,
            code: error["code"].as_str().unwrap_or("daemon_error").to_owned(),
            message: error["message"].as_str().unwrap_or("").to_owned(),
        })
    }
}
