"""What a federation's two sides agree on: the run config, what a method means, the names of
the records they exchange, and the data and model steps both run (below server_app and
client_app, which never import each other)."""
