"""Identity: normalising identifiers, keyed salted hashing, and ECDH private set intersection."""
