"""The transports: thin adapters that move bytes between the network and the upload service
(:mod:`server.uploads`): ``ws`` (the WebSocket protocol of :mod:`server.protocol`), ``tus``
(tus 1.0 resumable uploads with results over HTTP) and ``http`` (one-shot analysis routes).
"""
