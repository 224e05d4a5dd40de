"""The only package that talks to Redis: the connection, scripts, and what each role reads and writes."""
