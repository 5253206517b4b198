//! Per-element head math (work in progress).
