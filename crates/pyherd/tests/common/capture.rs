//! A `tracing` layer that records every event and every closed span with their fields,
//! so tests can check what pyherd reports.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// Field values rendered as strings (`message` holds an event's message).
pub type Fields = BTreeMap<String, String>;

/// One recorded event or closed span.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The span's name, or the event's target.
    pub name: String,
    pub fields: Fields,
    /// For an event: the name and fields of the span it happened in, if any.
    pub parent: Option<(String, Fields)>,
    pub level: tracing::Level,
}

impl Seen {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    pub fn message(&self) -> &str {
        self.get("message").unwrap_or("")
    }
}

/// What the layer saw so far.
#[derive(Clone, Default)]
pub struct Captured {
    events: Arc<Mutex<Vec<Seen>>>,
    spans: Arc<Mutex<Vec<Seen>>>,
}

impl Captured {
    pub fn events(&self) -> Vec<Seen> {
        self.events.lock().unwrap().clone()
    }

    /// Closed spans.
    pub fn spans(&self) -> Vec<Seen> {
        self.spans.lock().unwrap().clone()
    }

    /// Events whose message is `message`.
    pub fn with_message(&self, message: &str) -> Vec<Seen> {
        self.events()
            .into_iter()
            .filter(|e| e.message() == message)
            .collect()
    }
}

/// Starts capturing on this thread (a current-thread runtime runs every task here) until
/// the guard is dropped.
pub fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = Registry::default().with(Recorder(captured.clone()));
    let guard = tracing::subscriber::set_default(subscriber);
    (captured, guard)
}

struct Recorder(Captured);

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> Layer<S> for Recorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(&mut Visitor(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        let parent = ctx.event_span(event).map(|span| {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            (span.name().to_owned(), fields)
        });
        self.0.events.lock().unwrap().push(Seen {
            name: event.metadata().target().to_owned(),
            fields,
            parent,
            level: *event.metadata().level(),
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<Fields>()
                .cloned()
                .unwrap_or_default();
            self.0.spans.lock().unwrap().push(Seen {
                name: span.name().to_owned(),
                fields,
                parent: None,
                level: *span.metadata().level(),
            });
        }
    }
}
