"""Marshmallow schemas of the HTTP API: they validate requests and document the OpenAPI spec."""
