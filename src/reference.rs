//! The losses composed from plain candle tensor ops (work in progress).
