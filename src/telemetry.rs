//! Logs and traces: `tracing` for both, exported to OpenTelemetry (OTLP) when the standard
//! `OTEL_EXPORTER_OTLP_*` variables are set, and W3C trace context carried across gRPC, the
//! database (each saga keeps the `traceparent` of the call that started it) and AMQP headers.
//!
//! Spans are always created with OpenTelemetry ids, exporter or not, so trace ids show up in
//! logs and propagate to participants either way.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The W3C header, in gRPC metadata and AMQP headers alike.
pub const TRACEPARENT: &str = "traceparent";

const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,h2=warn,tower=warn,opentelemetry_sdk=warn";

/// Flushes buffered spans when the process stops.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs the global subscriber: human-readable or JSON logs (level from `RUST_LOG`) plus
    /// OpenTelemetry spans, exported over OTLP/gRPC when an `OTEL_EXPORTER_OTLP_*ENDPOINT` is
    /// set (service name from `OTEL_SERVICE_NAME`, else `service`).
    pub fn init(service: &str, json: bool) -> Telemetry {
        let exporter = otlp_configured()
            .then(|| {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            })
            .and_then(|r| {
                r.map_err(|e| eprintln!("OpenTelemetry exporter disabled: {e}"))
                    .ok()
            });
        let exporting = exporter.is_some();
        let provider = provider(service, exporter, false);
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
        // Colour codes only for a terminal: in a log file or a collector they are noise (and
        // formatting them costs CPU on every line).
        let fmt = tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
        let fmt = if json {
            fmt.json()
                .flatten_event(true)
                .with_current_span(true)
                .boxed()
        } else {
            fmt.boxed()
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel_layer(&provider))
            .init();
        if exporting {
            tracing::info!("exporting traces over OTLP");
        }
        Telemetry { provider }
    }

    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// A tracer provider; `simple` exports each span as it ends (tests), otherwise in batches.
pub fn provider<E: SpanExporter + 'static>(
    service: &str,
    exporter: Option<E>,
    simple: bool,
) -> SdkTracerProvider {
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    match exporter {
        Some(e) if simple => builder.with_simple_exporter(e),
        Some(e) => builder.with_batch_exporter(e),
        None => builder,
    }
    .build()
}

pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("saga-orchestrator"))
}

/// For code that builds its own subscriber (tests): the layers `init` installs, minus output.
pub fn test_subscriber(
    provider: &SdkTracerProvider,
) -> impl tracing::Subscriber + Send + Sync + use<> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    Registry::default()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(otel_layer(provider))
}

/// The `traceparent` of `span`, to store or to send.
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span described by `traceparent` (ignored if malformed).
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|t| !t.is_empty()) else {
        return;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` as 32 hex digits, for log lines.
pub fn trace_id(span: &Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_and_bad_headers_are_ignored() {
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = provider("test", Some(exporter.clone()), true);
        tracing::subscriber::with_default(test_subscriber(&provider), || {
            let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("child");
            set_parent(&span, Some(remote));
            let tp = traceparent(&span).unwrap();
            assert!(
                tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{tp}"
            );
            assert_ne!(tp, remote, "the child has its own span id");
            assert_eq!(trace_id(&span), "4bf92f3577b34da6a3ce929d0e0e4736");

            let fresh = tracing::info_span!("fresh");
            set_parent(&fresh, Some("garbage"));
            assert_ne!(trace_id(&fresh), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(traceparent(&fresh).is_some());
        });
    }
}
