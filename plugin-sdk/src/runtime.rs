//! The glue behind `export_plugin!`: instance state, config decoding, panic capture.

use crate::bindings::feature_host::plugin::types as wit;
use crate::{Event, Plugin, Writes};
use std::any::Any;
use std::cell::RefCell;

thread_local! {
    // A component instance is single-threaded; the host calls init once, then process.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Decode the config and build the plugin. Installs a panic hook so that a guest panic
/// reaches the host's logs with its message and location before the trap.
pub fn init<P: Plugin>(config: &str) -> Result<(), String> {
    std::panic::set_hook(Box::new(|info| {
        crate::log::error(&format!("plugin {info}"))
    }));
    let config = if config.trim().is_empty() {
        "null"
    } else {
        config
    };
    let config: P::Config = serde_json::from_str(config)
        .map_err(|e| format!("plugin config does not match the plugin's Config type: {e}"))?;
    let plugin = P::new(config)?;
    INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

/// Run the plugin over a batch: one result per event, in order.
pub fn process<P: Plugin>(
    events: Vec<wit::Event>,
) -> Vec<Result<Vec<wit::Write>, wit::EventError>> {
    INSTANCE.with(|slot| {
        let mut slot = slot.borrow_mut();
        let Some(plugin) = slot.as_mut().and_then(|p| p.downcast_mut::<P>()) else {
            let err =
                wit::EventError::Retryable("plugin was called before a successful init".into());
            return events.iter().map(|_| Err(err.clone())).collect();
        };
        events
            .into_iter()
            .map(|e| {
                let event = Event::from(e);
                let mut out = Writes::for_event(&event);
                match plugin.process(&event, &mut out) {
                    Ok(()) => Ok(out.into_vec().into_iter().map(Into::into).collect()),
                    Err(err) => Err(err.into()),
                }
            })
            .collect()
    })
}
