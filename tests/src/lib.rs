//! Shared helpers for Shoal's end-to-end tests (see `tests/tests/`).
