//! Configuration loading shared by `shoal coordinator` and `shoal agent`: defaults, then a
//! file (`--config`, TOML), then `SHOAL_<KEY>` environment variables, then flags. Unknown keys
//! in a file are errors; environment variables that name no key are ignored (so `SHOAL_LOG`
//! and the other binary's variables do not get in the way).
//!
//! Keys ending in `_ms`, `_hours`, `_bytes` and `_bytes_per_sec` take an integer or a string
//! with units (`"30s"`, `"100GiB"`, `"200Mbit/s"`), in the file and in `SHOAL_` variables
//! alike; see `shoal_proto::units`.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Loads a `T`, or returns one line naming what is wrong.
pub fn load<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    overrides: &[(&str, Option<String>)],
) -> Result<T, String> {
    let defaults = serde_json::to_value(T::default()).map_err(|e| e.to_string())?;
    let known: Vec<String> = defaults
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let mut builder = config::Config::builder()
        .add_source(config::Config::try_from(&T::default()).map_err(|e| e.to_string())?);
    if let Some(path) = file {
        if !path.is_file() {
            return Err(format!("config file {} does not exist", path.display()));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let env: config::Map<String, String> = std::env::vars()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("SHOAL_")?.to_ascii_lowercase();
            known.contains(&key).then_some((key, v))
        })
        .collect();
    builder = builder.add_source(
        config::Environment::default()
            .source(Some(env))
            .try_parsing(true),
    );
    for (key, value) in overrides {
        if let Some(v) = value {
            builder = builder
                .set_override(*key, v.clone())
                .map_err(|e| e.to_string())?;
        }
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| format!("configuration: {}", describe(e)))
}

/// One line, the key first (`quota_bytes: ...`) when the error is about one value, as the
/// checks after loading word theirs.
fn describe(e: config::ConfigError) -> String {
    match e {
        config::ConfigError::At {
            error,
            key: Some(key),
            origin,
        } => match origin {
            Some(origin) => format!("{key}: {error} (in {origin})"),
            None => format!("{key}: {error}"),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
