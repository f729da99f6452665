"""The core: one Perspective session bridged to one websocket, with no web framework in sight.

It reads as a pipeline, one module a stage::

    transport.receive()                                           transport.send()
          |                                                              ^
       wire.py        read and check each frame's envelope               |
          |                                                           outbox.py
       guards.py      rate -> policy.py -> views.py: admit or refuse     ^   bounded in bytes,
          |                                                              |   any thread puts
       runner.py      run it: on the loop, in a thread, on an executor   |
          |           or awaited (AsyncServer); close the session once   |
          +---------------> Perspective session --- callback -----------+
                                                         |
                                                      hosted.py  (allow-lists: pass a
                                                                  hosted-tables change on
                                                                  only if visible)

``bridge.py`` owns a connection's lifecycle and its loops; ``registry.py`` the process-wide
state shared by connections (running bridges, thread limiters, busy engines); ``costs.py``
what requests have cost each engine, which decides what ``runner.py`` runs on the loop;
``limits.py`` connection slots and the token bucket; ``memory.py`` the allocator trim after
large messages. Nothing here imports a web framework, and nothing
imported from this package's ``__init__``: import the module you need.
"""
