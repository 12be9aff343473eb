-- 0009_refund_states.sql — refunds, steps 2–5 (issue 15): a refund of a closed or archived drop's
-- order ends `closed` (paid back, and counted as returned in Postgres' books — and in Redis' while
-- the closed drop is still there — but no stock goes back on sale: the drop sells nothing more);
-- and the resume round's work list: refunds not finished, least recently touched first.
-- Expand-only: the previous release writes only `pending` and never reads the index.
ALTER TABLE refunds DROP CONSTRAINT refunds_state_check;
ALTER TABLE refunds ADD CONSTRAINT refunds_state_check
    CHECK (state IN ('pending', 'gateway_done', 'returned', 'closed'));
CREATE INDEX refunds_unfinished ON refunds (updated_at) WHERE state IN ('pending', 'gateway_done');
