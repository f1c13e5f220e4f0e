//! Logs and exec of pods, through any replica (which calls the pod's node).

use std::sync::Mutex;

use futures::Stream;

use super::retry::CallKind;
use super::{Client, ClientError};
use crate::proto::v1 as pb;
use crate::proto::v1::pods_client::PodsClient;

impl Client {
    /// A container's log: what it holds, then (with `follow`) what comes until the
    /// container stops. No deadline.
    pub async fn logs(&self, req: pb::LogsRequest) -> Result<tonic::Streaming<pb::LogChunk>, ClientError> {
        let (stream, _) = self
            .call(CallKind::Read, |ch| {
                let req = tonic::Request::new(req.clone());
                async move { PodsClient::new(ch).logs(req).await }
            })
            .await?;
        Ok(stream)
    }

    /// Runs a command in a container: `input` starts with `ExecStart`, then carries stdin,
    /// resizes and the end of input; the answer is its output and, last, its exit code. Not
    /// repeated on another replica once sent (a command may have run).
    pub async fn exec(
        &self,
        input: impl Stream<Item = pb::ExecInput> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::ExecOutput>, ClientError> {
        let input = Mutex::new(Some(Box::pin(input)));
        let (stream, _) = self
            .call(CallKind::Write, |ch| {
                let taken = input.lock().unwrap_or_else(|p| p.into_inner()).take();
                async move {
                    let Some(input) = taken else {
                        return Err(tonic::Status::unavailable("the exec's input was sent to another replica"));
                    };
                    PodsClient::new(ch).exec(tonic::Request::new(input)).await
                }
            })
            .await?;
        Ok(stream)
    }
}
