"""Perspective in FastAPI: tables made by the lifespan, users authenticated by a dependency,
and what each user may do chosen by a policy.

Run it from the repository root, either way::

    python examples/fastapi_app.py
    uvicorn examples.fastapi_app:app --port 8080

then connect a Perspective client with a token, in the query string as a browser must
(``perspective.websocket("ws://127.0.0.1:8080/websocket?token=alice-token")``) or, from a
script, in an ``Authorization: Bearer alice-token`` header. A handshake without a known token
is refused with HTTP 403. ``$PORT`` changes the port of the first command.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import perspective
import uvicorn
from fastapi import Depends, FastAPI, Header, WebSocket, WebSocketException, status

from perspective_asgi import Policy, Settings, close_all_connections
from perspective_asgi.adapters.starlette import PerspectiveStarletteHandler


@dataclass(frozen=True)
class User:
    name: str
    read_only: bool = False


# A stand-in for your own user store: look the token up in your database or identity provider.
USERS_BY_TOKEN = {
    "alice-token": User("alice"),
    "bob-token": User("bob", read_only=True),
}


def policy(user: User) -> Policy:
    """Return what ``user`` may do: read-only users may not create, change or delete tables."""
    return Policy(read_only=user.read_only)


SETTINGS = Settings(policy=policy)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, perspective.Server]]:
    server = perspective.Server()
    server.new_local_client().table(
        {
            "region": ["North", "South", "East", "West"],
            "units": [120, 95, 143, 88],
            "price": [9.5, 11.0, 8.75, 12.25],
        },
        name="sales",
        index="region",
    )
    # Each websocket finds the server in its state: websocket.state.perspective_server.
    yield {"perspective_server": server}
    # Close with 1001 (going away) any websocket the web server left open; uvicorn closes
    # its own before this runs, with 1012 (service restart).
    await close_all_connections()


app = FastAPI(lifespan=lifespan)


async def current_user(token: str = "", authorization: Annotated[str, Header()] = "") -> User:
    """Return the user whose token is in the query string or the ``Authorization`` header."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        token = credentials
    user = USERS_BY_TOKEN.get(token)
    if user is None:
        # Raised before the handshake is accepted: the client gets HTTP 403.
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)
    return user


@app.websocket("/websocket")
async def websocket(websocket: WebSocket, user: Annotated[User, Depends(current_user)]) -> None:
    handler = PerspectiveStarletteHandler(
        perspective_server=websocket.state.perspective_server,
        websocket=websocket,
        principal=user,  # passed to SETTINGS.policy
        settings=SETTINGS,
    )
    await handler.run()


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
