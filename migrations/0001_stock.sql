-- Stock of each product, and every order applied to it. Portable SQL: the same migration runs
-- on SQLite and PostgreSQL.

CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    -- Fencing token of the product-lock grant that wrote this row last. A write is accepted only
    -- with a fence at least this high, so a holder whose lease ran out cannot overwrite a newer
    -- holder's work.
    last_fence  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE orders (
    id              TEXT PRIMARY KEY,
    created_ms      BIGINT NOT NULL,
    -- Set once RestoreStock gave the order's quantities back.
    restored_ms     BIGINT
);

CREATE TABLE order_items (
    order_id    TEXT NOT NULL REFERENCES orders (id),
    product_id  TEXT NOT NULL REFERENCES products (id),
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    -- Stock left right after the order was applied: the answer a replay repeats.
    remaining   BIGINT NOT NULL CHECK (remaining >= 0),
    PRIMARY KEY (order_id, product_id)
);

CREATE INDEX order_items_by_product ON order_items (product_id);
