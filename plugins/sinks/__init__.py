"""Built-in sinks, one file each; registered under the ``livecc.sinks`` entry point group."""
