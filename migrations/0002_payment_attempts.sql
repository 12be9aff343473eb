-- 0002_payment_attempts.sql — payments per attempt: one row per (hold_id, reference), every
-- state write keyed by its attempt, and a `voiding` state for an attempt that ended without a
-- sale but whose void the gateway hasn't confirmed yet.
--
-- The expand step of a rolling deploy. Until every instance runs this release, instances of the
-- previous one still read and write `payments` (one row per hold, its latest attempt) while this
-- release reads and writes only `payment_attempts`. The two triggers below keep them in step
-- inside each writer's transaction, so an attempt begun on one release can be committed, voided
-- or reconciled on the other and Postgres still arbitrates it once:
--   * a write to `payment_attempts` (this release) is copied onto `payments`' row for the hold;
--   * a write to `payments` (the previous release) is applied to the attempt it names — and
--     refused (the statement writes no row) where the attempt has already moved on, e.g. a
--     begin of an attempt the reconciler has already voided, or a commit of one it is voiding.
-- A later migration (docs/OPERATIONS.md, "Schema changes") drops `payments`, the triggers and
-- their functions, once no instance of the previous release is left.

CREATE TABLE payment_attempts (
    hold_id       text NOT NULL,
    reference     text NOT NULL,
    drop_id       text NOT NULL REFERENCES drops (drop_id),
    fan_id        text NOT NULL,
    gateway       text NOT NULL,
    amount_cents  bigint NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'authorized', 'declined', 'captured', 'voiding', 'voided')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hold_id, reference)
);
-- The reconciler's work list (every unsettled attempt, whatever its drop), oldest first.
CREATE INDEX payment_attempts_unsettled ON payment_attempts (updated_at)
    WHERE state IN ('pending', 'voiding', 'authorized');

INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state, created_at, updated_at)
SELECT hold_id, reference, drop_id, fan_id, gateway, amount_cents, state, created_at, updated_at FROM payments;

-- This release's writes, onto the previous release's one row per hold. `voiding` is `voided`
-- there: to the previous release both mean "ended, no sale".
CREATE FUNCTION payments_follow_attempts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_state text := CASE WHEN NEW.state = 'voiding' THEN 'voided' ELSE NEW.state END;
BEGIN
    -- Written by the other trigger (a write of the previous release's): already in step.
    IF pg_trigger_depth() > 1 THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO payments (hold_id, drop_id, fan_id, gateway, reference, amount_cents, state)
        VALUES (NEW.hold_id, NEW.drop_id, NEW.fan_id, NEW.gateway, NEW.reference, NEW.amount_cents, old_state)
        ON CONFLICT (hold_id) DO UPDATE SET reference = EXCLUDED.reference, state = EXCLUDED.state,
            fan_id = EXCLUDED.fan_id, gateway = EXCLUDED.gateway, amount_cents = EXCLUDED.amount_cents,
            updated_at = now();
    ELSE
        UPDATE payments SET state = old_state, updated_at = now()
        WHERE hold_id = NEW.hold_id AND reference = NEW.reference;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER payments_follow_attempts AFTER INSERT OR UPDATE OF state ON payment_attempts
    FOR EACH ROW EXECUTE FUNCTION payments_follow_attempts();

-- The previous release's writes, onto the attempt they name, allowed only along the moves an
-- attempt can make; anything else means this release settled the attempt first, and the write
-- is skipped (RETURN NULL), which the previous release reads as "not mine any more".
CREATE FUNCTION attempts_follow_payments() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    cur text;
BEGIN
    -- Written by the other trigger (a write of this release's): pass it through.
    IF pg_trigger_depth() > 1 THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.reference = OLD.reference AND NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    SELECT state INTO cur FROM payment_attempts
    WHERE hold_id = NEW.hold_id AND reference = NEW.reference FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO payment_attempts (hold_id, reference, drop_id, fan_id, gateway, amount_cents, state)
        VALUES (NEW.hold_id, NEW.reference, NEW.drop_id, NEW.fan_id, NEW.gateway, NEW.amount_cents, NEW.state);
        RETURN NEW;
    END IF;
    IF cur = NEW.state THEN
        RETURN NEW;
    END IF;
    -- (`voiding` → `voided` is not among them: only this release's reconciler, once the gateway
    -- confirms the void, ends a `voiding` attempt.)
    IF (cur = 'pending' AND NEW.state IN ('authorized', 'declined', 'voided'))
       OR (cur = 'authorized' AND NEW.state = 'captured') THEN
        UPDATE payment_attempts SET state = NEW.state, updated_at = now()
        WHERE hold_id = NEW.hold_id AND reference = NEW.reference;
        RETURN NEW;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER attempts_follow_payments BEFORE INSERT OR UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION attempts_follow_payments();
