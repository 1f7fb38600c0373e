"""Built-in plugins: sources and sinks, registered through entry points like third-party ones."""
