//! Logs and traces.
//!
//! [`init`] installs a `tracing` subscriber that prints logs (plain, or JSON
//! when `CORRAL_LOG_FORMAT=json`) and always keeps OpenTelemetry span
//! contexts, so trace ids exist and travel in NATS headers even when nothing
//! is exported. Spans are exported over OTLP/HTTP only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise logs are all there is.
//!
//! [`inject`] and [`adopt`] carry W3C trace context (`traceparent`) across
//! NATS so the CLI's publish, the spawner's work and the tracker's
//! transitions of one run form one trace.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when shut down.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes pending spans; call before the process exits.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry shutdown failed: {err}");
        }
    }
}

/// Installs the global subscriber for `service`. Log level from `RUST_LOG`
/// (default `info`). Fails only if a subscriber is already installed.
pub fn init(service: &'static str) -> Result<Telemetry, String> {
    init_with(service, &Logging::default())
}

/// Where logs go and at what level when `RUST_LOG` does not say.
#[derive(Clone, Debug)]
pub struct Logging {
    /// The level (an `EnvFilter` directive) unless `RUST_LOG` is set.
    pub default_level: String,
    /// A file to append logs to instead of standard error.
    pub file: Option<std::path::PathBuf>,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            default_level: "info".into(),
            file: None,
        }
    }
}

/// [`init`] with the level and destination of `logging`.
pub fn init_with(service: &'static str, logging: &Logging) -> Result<Telemetry, String> {
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build(),
    );
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if exporting {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(err) => eprintln!("otlp exporter unavailable, logging only: {err}"),
        }
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&logging.default_level));
    let json = std::env::var("CORRAL_LOG_FORMAT").is_ok_and(|v| v == "json");
    let (writer, ansi) = match &logging.file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| format!("cannot open the log file {}: {err}", path.display()))?;
            (
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file)),
                false,
            )
        }
        None => (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = if json {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(writer))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            )
            .try_init()
    };
    result.map_err(|err| err.to_string())?;
    Ok(Telemetry { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn adopt(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get(corral_proto::headers::TRACEPARENT).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}
