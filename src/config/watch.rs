//! STUB (to be replaced): the config file watcher.
