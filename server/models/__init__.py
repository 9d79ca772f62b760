"""Model versions and rollouts: a folder of revisions per model (:mod:`.store`), a task that
serves the active one and switches without dropping a request (:mod:`.versioned`), and the
admin routes and Redis channel that trigger and spread a switch (:mod:`.admin`)."""
