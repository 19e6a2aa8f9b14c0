//! # feature-host plugin SDK
//!
//! Write a feature transform in plain Rust; build it with
//! `cargo build --release --target wasm32-wasip2`; drop the `.wasm` into the host's plugin
//! directory. You never see the component-model ABI.
//!
//! A plugin is a type implementing [`Plugin`], exported with [`export_plugin!`]:
//!
//! ```
//! use feature_host_plugin_sdk::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Config { field: String }
//!
//! struct CountByField { field: String }
//!
//! impl Plugin for CountByField {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Self { field: config.field })
//!     }
//!
//!     fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
//!         let body: serde_json::Value = event.json()?;
//!         let entity = body[&self.field]
//!             .as_str()
//!             .ok_or_else(|| EventError::invalid(format!("missing string field `{}`", self.field)))?;
//!         out.entity(entity).incr("events", 1);
//!         Ok(())
//!     }
//! }
//!
//! export_plugin!(CountByField);
//! # fn main() {}
//! ```
//!
//! The host calls [`Plugin::new`] once per instance with the `plugin.config` object of the
//! FeatureGroup spec, then [`Plugin::process`] once per event of each batch. Writes are
//! *operations* (set, incr, max, min, append, delete) that the host applies atomically in the
//! stores, with event-time ordering: keep no feature state in the plugin.

extern crate self as feature_host_plugin_sdk;

mod event;
mod runtime;
mod value;
mod writes;

pub use event::{Event, EventError, Header};
pub use value::Value;
pub use writes::{EntityWrites, Op, Write, Writes};

/// Generated component-model bindings. Not part of the stable API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "feature-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_feature_plugin",
        default_bindings_module: "::feature_host_plugin_sdk::bindings",
        runtime_path: "::feature_host_plugin_sdk::__private::wit_bindgen::rt",
    });
}

/// Implementation details used by [`export_plugin!`]. Not part of the stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::runtime::{init, process};
    pub use wit_bindgen;
}

/// Everything a plugin author needs, in one import.
///
/// ```
/// use feature_host_plugin_sdk::prelude::*;
/// let v: Value = 3.into();
/// assert_eq!(v, Value::Int(3));
/// ```
pub mod prelude {
    pub use crate::{
        Event, EventError, Header, Op, Plugin, Value, Write, Writes, export_plugin, log,
    };
}

/// A feature transform.
///
/// `Config` is deserialized from the `plugin.config` object of the FeatureGroup spec (use
/// `()` if the plugin takes none). State kept in `self` lives as long as the instance, which
/// the host may recycle at any time: keep only configuration and caches there, never feature
/// state.
///
/// ```
/// use feature_host_plugin_sdk::prelude::*;
///
/// struct Echo;
/// impl Plugin for Echo {
///     type Config = ();
///     fn new(_: ()) -> Result<Self, String> { Ok(Echo) }
///     fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
///         out.entity(event.key_str().unwrap_or("unknown")).set("last_payload", event.payload.clone());
///         Ok(())
///     }
/// }
///
/// // Plugins are plain Rust: test them natively.
/// let mut plugin = Echo::new(()).unwrap();
/// let event = Event::for_test(b"hello").with_key("u1");
/// let writes = plugin.run(&event).unwrap();
/// assert_eq!(writes[0].entity, "u1");
/// ```
pub trait Plugin: Sized + 'static {
    /// The plugin's configuration, from the spec's `plugin.config`.
    type Config: serde::de::DeserializeOwned;

    /// Build an instance from its configuration. An error rejects the plugin version.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Turn one event into feature writes appended to `out`.
    ///
    /// Return [`EventError::invalid`] for events that can never succeed (they go to the
    /// dead-letter topic) and [`EventError::retryable`] for transient problems.
    fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError>;

    /// Run [`Plugin::process`] for one event and return its writes: handy in tests.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::prelude::*;
    /// # struct P;
    /// # impl Plugin for P {
    /// #     type Config = ();
    /// #     fn new(_: ()) -> Result<Self, String> { Ok(P) }
    /// #     fn process(&mut self, e: &Event, out: &mut Writes) -> Result<(), EventError> {
    /// #         out.entity("e").incr("n", 1); Ok(())
    /// #     }
    /// # }
    /// let writes = P.run(&Event::for_test(b"{}")).unwrap();
    /// assert_eq!(writes.len(), 1);
    /// ```
    fn run(&mut self, event: &Event) -> Result<Vec<Write>, EventError> {
        let mut out = Writes::for_event(event);
        self.process(event, &mut out)?;
        Ok(out.into_vec())
    }
}

/// Log a message into the host's logs, tagged with the plugin and its version.
///
/// Outside a host (native tests) messages go to stderr.
///
/// ```
/// feature_host_plugin_sdk::log::info("configured with last_k=20");
/// ```
pub mod log {
    use crate::bindings::feature_host::plugin::log as wit;

    fn emit(level: wit::Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        wit::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Log at debug level.
    ///
    /// ```
    /// feature_host_plugin_sdk::log::debug("parsed event");
    /// ```
    pub fn debug(message: &str) {
        emit(wit::Level::Debug, message)
    }

    /// Log at info level.
    ///
    /// ```
    /// feature_host_plugin_sdk::log::info("ready");
    /// ```
    pub fn info(message: &str) {
        emit(wit::Level::Info, message)
    }

    /// Log at warn level.
    ///
    /// ```
    /// feature_host_plugin_sdk::log::warn("unknown event type, ignored");
    /// ```
    pub fn warn(message: &str) {
        emit(wit::Level::Warn, message)
    }

    /// Log at error level.
    ///
    /// ```
    /// feature_host_plugin_sdk::log::error("upstream sent a negative price");
    /// ```
    pub fn error(message: &str) {
        emit(wit::Level::Error, message)
    }
}

/// Export a [`Plugin`] implementation as the component's entry points.
///
/// Use it exactly once, at the crate root of a `cdylib` crate built for `wasm32-wasip2`.
///
/// ```
/// use feature_host_plugin_sdk::prelude::*;
/// struct Nothing;
/// impl Plugin for Nothing {
///     type Config = ();
///     fn new(_: ()) -> Result<Self, String> { Ok(Nothing) }
///     fn process(&mut self, _: &Event, _: &mut Writes) -> Result<(), EventError> { Ok(()) }
/// }
/// export_plugin!(Nothing);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct __FeatureHostGuest;

        impl $crate::bindings::Guest for __FeatureHostGuest {
            fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::init::<$plugin>(&config)
            }

            fn process(
                events: ::std::vec::Vec<$crate::bindings::feature_host::plugin::types::Event>,
            ) -> ::std::vec::Vec<
                ::std::result::Result<
                    ::std::vec::Vec<$crate::bindings::feature_host::plugin::types::Write>,
                    $crate::bindings::feature_host::plugin::types::EventError,
                >,
            > {
                $crate::__private::process::<$plugin>(events)
            }
        }

        $crate::bindings::__export_feature_plugin!(__FeatureHostGuest with_types_in $crate::bindings);
    };
}
