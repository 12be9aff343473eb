-- 0010_drop_cancellations.sql — cancelling a whole drop (issue 15): the drop is closed and a job
-- refunds every order of it, whole, in bounded batches under the drop's round lease
-- (engine/src/booking/cancel.rs). The job's state lives here, so a restart picks it up where it
-- stopped; each order's refund has the deterministic id `cancel-<drop id>`, so an order refunded
-- before a crash is the same refund when the job runs again. Expand-only: the previous release
-- never reads the table, and never writes a `cancel` audit line.
CREATE TABLE drop_cancellations (
    drop_id          text PRIMARY KEY REFERENCES drops (drop_id),
    -- The caller's id for the cancel request (the same drop cancelled again is the same job).
    request_id       text NOT NULL,
    -- The key that asked for it (its id, never the secret).
    key_id           text NOT NULL,
    state            text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done')),
    -- Orders with something to refund when the job last looked, and those the job refunded.
    orders_total     integer NOT NULL DEFAULT 0 CHECK (orders_total >= 0),
    orders_refunded  integer NOT NULL DEFAULT 0 CHECK (orders_refunded >= 0),
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- The job's work list: cancellations still running.
CREATE INDEX drop_cancellations_running ON drop_cancellations (started_at) WHERE state = 'running';

-- The audit log records a cancel (which closes the drop) as its own action.
ALTER TABLE admission_audit DROP CONSTRAINT admission_audit_action_check;
ALTER TABLE admission_audit ADD CONSTRAINT admission_audit_action_check
    CHECK (action IN ('admission', 'close', 'cancel'));
