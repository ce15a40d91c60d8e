//! Replies over sagad's gRPC API (`SagaService/ReportStepResult`), for participants that may
//! consume their command queue but not publish to the broker.

use std::time::Duration;

use saga_contract::{ReplyBody, ReplyOutcome};
use saga_proto::v1 as pb;
use saga_proto::v1::saga_service_client::SagaServiceClient;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where and how to report results: `Participant::reply_via_grpc(GrpcReplies::new(url))`.
///
/// The command is still consumed from RabbitMQ and goes through the same barrier; only its
/// reply is sent as a `ReportStepResult` call instead of a message, and the command is
/// acknowledged once sagad answered. A token bound to participants in sagad's tokens file
/// (`participants = ["payment"]`) may only report results of commands sent to those.
#[derive(Clone)]
pub struct GrpcReplies {
    pub(crate) endpoint: String,
    pub(crate) token: Option<String>,
    pub(crate) ca_pem: Option<String>,
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for GrpcReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("GrpcReplies")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl GrpcReplies {
    /// sagad's API address: `http://host:50051`, or `https://…` with [`Self::ca_certificate`].
    pub fn new(endpoint: impl Into<String>) -> GrpcReplies {
        GrpcReplies {
            endpoint: endpoint.into(),
            token: None,
            ca_pem: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// A participant token, sent as `authorization: Bearer <token>`.
    pub fn token(mut self, token: impl Into<String>) -> GrpcReplies {
        self.token = Some(token.into());
        self
    }

    /// The PEM certificate to trust for an `https://` endpoint.
    pub fn ca_certificate(mut self, pem: impl Into<String>) -> GrpcReplies {
        self.ca_pem = Some(pem.into());
        self
    }

    /// How long one report may take before the command is requeued (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> GrpcReplies {
        self.timeout = timeout;
        self
    }

    /// The client; it connects on first use, so a sagad that is down does not stop the start.
    pub(crate) fn client(&self) -> Result<Reporter, String> {
        let https = self.endpoint.starts_with("https://");
        if !https && !self.endpoint.starts_with("http://") {
            return Err(format!(
                "invalid gRPC endpoint {:?}: expected http://HOST:PORT or https://HOST:PORT",
                self.endpoint
            ));
        }
        let auth = match &self.token {
            None => Auth(None),
            Some(token) => Auth(Some(
                AsciiMetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| "the gRPC token holds characters not allowed in a header")?,
            )),
        };
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| format!("invalid gRPC endpoint {:?}: {e}", self.endpoint))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if https {
            let Some(pem) = &self.ca_pem else {
                return Err("an https:// gRPC endpoint needs ca_certificate(PEM)".into());
            };
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("gRPC TLS configuration: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Reporter(SagaServiceClient::new(InterceptedService::new(
            channel, auth,
        ))))
    }
}

#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

#[derive(Clone)]
pub(crate) struct Reporter(SagaServiceClient<InterceptedService<Channel, Auth>>);

/// What became of a report.
pub(crate) enum Reported {
    /// sagad recorded it (`applied` false: it had the answer already, or the attempt ended).
    Done { applied: bool },
    /// sagad refused it for good (it never sent that command, or finds the report invalid):
    /// sending it again cannot help. The step times out, as for an unroutable reply.
    Refused(String),
}

impl Reporter {
    /// Reports the stored reply; an error means "try again later" (the command is requeued).
    pub async fn report(&self, reply: &str, traceparent: Option<&str>) -> Result<Reported, String> {
        let reply = ReplyBody::parse(reply.as_bytes())?;
        let request = pb::ReportStepResultRequest {
            command_id: reply.command_id.to_string(),
            outcome: match reply.outcome {
                ReplyOutcome::Success => pb::Outcome::Success,
                ReplyOutcome::Failure => pb::Outcome::Failure,
            } as i32,
            output_json: if reply.output.is_null() {
                String::new()
            } else {
                reply.output.to_string()
            },
            reason: reply.reason.unwrap_or_default(),
            retryable: reply.retryable,
        };
        let mut request = tonic::Request::new(request);
        if let Some(value) = traceparent.and_then(|tp| AsciiMetadataValue::try_from(tp).ok()) {
            request.metadata_mut().insert("traceparent", value);
        }
        match self.0.clone().report_step_result(request).await {
            Ok(answer) => Ok(Reported::Done {
                applied: answer.into_inner().applied,
            }),
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => Ok(
                Reported::Refused(format!("{:?}: {}", status.code(), status.message())),
            ),
            Err(status) => Err(format!(
                "ReportStepResult: {:?}: {}",
                status.code(),
                status.message()
            )),
        }
    }
}
