"""Deploy bundles: the format (manifest.py), the base's origin (origin.py), the user's consent (consent.py), opening
one for serving (opening.py), loading it (loader.py), the model card (card.py), publishing (publish.py), and
`python -m ptune.bundle` (command.py).

Nothing is imported here, so that reading a bundle's manifest imports no torch."""
