"""The HTTP adapter: routes, wire formats, errors, auth. No update is computed here."""
