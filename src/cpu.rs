//! CPU bodies (work in progress).
