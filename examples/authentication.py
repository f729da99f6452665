"""Who may connect, and what each user may do: an ``authenticate`` hook and a ``Policy`` per
user, on a plain ASGI app.

Run it, then connect a Perspective client to ws://127.0.0.1:8080/websocket with a token
(``$PORT`` changes the port)::

    python examples/authentication.py

The token comes in an ``Authorization: Bearer ...`` header (scripts), or, since browsers cannot
set headers on a websocket, as ``?token=...`` or a ``token`` cookie. Without one the handshake
is refused with HTTP 401, with an unknown one 403. ``admin-token`` may do anything;
``analyst-token`` sees the ``sales`` table only, may not change it, and may not write
expression columns. The same ``Settings`` work in every adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import perspective
import uvicorn

from perspective_asgi import (
    AuthenticationFailed,
    HandshakeRequest,
    PerspectiveASGIApp,
    Policy,
    Settings,
)


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool = False


# A stand-in for your own user store: look the token up in your database or identity provider.
USERS_BY_TOKEN = {
    "admin-token": User("admin", is_admin=True),
    "analyst-token": User("analyst"),
}


async def authenticate(request: HandshakeRequest) -> User | None:
    """Return the user whose token the handshake carries; ``None`` if it carries none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        token = request.query.get("token") or request.cookies.get("token", "")
    if not token:
        return None  # refused with 401
    user = USERS_BY_TOKEN.get(token)
    if user is None:
        raise AuthenticationFailed(403, "unknown token")
    return user


def policy(user: User) -> Policy:
    """Return what ``user`` may do, once per connection, before its session starts."""
    if user.is_admin:
        return Policy()  # everything
    return Policy(tables={"sales"}, read_only=True, allow_expressions=False)


server = perspective.Server()
client = server.new_local_client()
client.table(
    {
        "region": ["North", "South", "East", "West"],
        "units": [120, 95, 143, 88],
        "price": [9.5, 11.0, 8.75, 12.25],
    },
    name="sales",
    index="region",
)
client.table(
    {"region": ["North", "South", "East", "West"], "unit_cost": [6.1, 7.4, 5.9, 8.2]},
    name="costs",
    index="region",
)

settings = Settings(
    authenticate=authenticate,
    policy=policy,
    max_connections_per_principal=8,  # a user's ninth connection is closed with 1013
)
app = PerspectiveASGIApp(server, settings=settings)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
