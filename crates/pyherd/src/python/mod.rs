//! Locating the Python interpreter and providing the embedded `pyherd_worker` package.

mod interpreter;
mod package;

pub(crate) use interpreter::resolve;
pub(crate) use package::install;
