//go:build linux
// +build linux

package conformance

// TestContract: checks that are NOT in containerd's testsuite but that
// containerd 1.6 (metadata layer, GC, remote-snapshotter "target" flow) and
// ctr/nerdctl rely on: exact error kinds (= gRPC codes through the proxy),
// label semantics, key syntax, filters, read-only views, usage. Every check
// here passes against containerd's own overlayfs snapshotter
// (CONFORMANCE_BASELINE=overlayfs); run it with -test.run TestContract.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/log/logtest"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
)

type kindCheck struct {
	name string
	is   func(error) bool
}

var (
	notFound           = kindCheck{"NotFound", errdefs.IsNotFound}
	alreadyExists      = kindCheck{"AlreadyExists", errdefs.IsAlreadyExists}
	failedPrecondition = kindCheck{"FailedPrecondition", errdefs.IsFailedPrecondition}
	invalidArgument    = kindCheck{"InvalidArgument", errdefs.IsInvalidArgument}
)

func expectKind(t *testing.T, what string, err error, want kindCheck) {
	t.Helper()
	switch {
	case err == nil:
		t.Errorf("%s: expected %s error, got success", what, want.name)
	case !want.is(err):
		t.Errorf("%s: expected %s error, got %v", what, want.name, err)
	}
}

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %+v", what, err)
	}
}

func withLabels(kv ...string) snapshots.Opt {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return snapshots.WithLabels(m)
}

func TestContract(t *testing.T) {
	name, newSnapshotter := backend(t)

	run := func(sub string, fn func(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string)) {
		t.Run(sub, func(t *testing.T) {
			ctx := logtest.WithT(context.Background(), t)
			ctx = namespaces.WithNamespace(ctx, "testsuite")
			tmp, err := os.MkdirTemp("", "snapshot-contract-")
			must(t, "mkdtemp", err)
			defer os.RemoveAll(tmp)
			root := filepath.Join(tmp, "root")
			work := filepath.Join(tmp, "work")
			must(t, "mkdir", os.MkdirAll(root, 0777))
			must(t, "mkdir", os.MkdirAll(work, 0777))
			sn, cleanup, err := newSnapshotter(ctx, root)
			if err != nil {
				t.Fatalf("failed to initialize %s: %+v", name, err)
			}
			defer func() {
				if err := cleanup(); err != nil {
					t.Errorf("cleanup failed: %v", err)
				}
			}()
			fn(ctx, t, sn, work)
		})
	}

	run("ErrorKinds", contractErrorKinds)
	run("AtomicFailures", contractAtomicFailures)
	run("Labels", contractLabels)
	run("ContainerdKeys", contractContainerdKeys)
	run("TargetRefFilter", contractTargetRefFilter)
	run("FilterSyntax", contractFilterSyntax)
	run("MountShapes", contractMountShapes)
	run("Usage", contractUsage)
	run("Cleanup", contractCleanup)
}

func contractErrorKinds(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	_, err := sn.Prepare(ctx, "c1-a", "")
	must(t, "prepare c1-a", err)
	must(t, "commit c1", sn.Commit(ctx, "c1", "c1-a"))
	_, err = sn.Prepare(ctx, "a1", "c1")
	must(t, "prepare a1", err)
	_, err = sn.View(ctx, "v1", "c1")
	must(t, "view v1", err)

	// Missing keys.
	_, err = sn.Stat(ctx, "missing")
	expectKind(t, "Stat(missing)", err, notFound)
	_, err = sn.Usage(ctx, "missing")
	expectKind(t, "Usage(missing)", err, notFound)
	_, err = sn.Mounts(ctx, "missing")
	expectKind(t, "Mounts(missing)", err, notFound)
	_, err = sn.Update(ctx, snapshots.Info{Name: "missing", Labels: map[string]string{"a": "b"}})
	expectKind(t, "Update(missing)", err, notFound)
	expectKind(t, "Remove(missing)", sn.Remove(ctx, "missing"), notFound)
	expectKind(t, "Commit(x, missing)", sn.Commit(ctx, "x", "missing"), notFound)
	_, err = sn.Prepare(ctx, "p-missing-parent", "missing")
	expectKind(t, "Prepare(k, missing parent)", err, notFound)
	_, err = sn.View(ctx, "v-missing-parent", "missing")
	expectKind(t, "View(k, missing parent)", err, notFound)

	// Duplicates (key namespace is shared by active, view and committed).
	_, err = sn.Prepare(ctx, "a1", "")
	expectKind(t, "Prepare(existing active key)", err, alreadyExists)
	_, err = sn.View(ctx, "a1", "")
	expectKind(t, "View(existing active key)", err, alreadyExists)
	_, err = sn.Prepare(ctx, "c1", "")
	expectKind(t, "Prepare(key == committed name)", err, alreadyExists)
	_, err = sn.Prepare(ctx, "v1", "c1")
	expectKind(t, "Prepare(existing view key)", err, alreadyExists)
	expectKind(t, "Commit(existing committed name, active)", sn.Commit(ctx, "c1", "a1"), alreadyExists)
	expectKind(t, "Commit(name == existing view key, active)", sn.Commit(ctx, "v1", "a1"), alreadyExists)

	// Wrong kinds.
	_, err = sn.Prepare(ctx, "p-on-active", "a1")
	expectKind(t, "Prepare(k, parent is active)", err, invalidArgument)
	_, err = sn.View(ctx, "v-on-view", "v1")
	expectKind(t, "View(k, parent is view)", err, invalidArgument)
	expectKind(t, "Commit(n, view)", sn.Commit(ctx, "c-from-view", "v1"), failedPrecondition)
	expectKind(t, "Commit(n, committed)", sn.Commit(ctx, "c-from-c", "c1"), failedPrecondition)
	_, err = sn.Mounts(ctx, "c1")
	expectKind(t, "Mounts(committed)", err, failedPrecondition)
	expectKind(t, "Remove(committed with children)", sn.Remove(ctx, "c1"), failedPrecondition)

	// Update: only labels / labels.* are mutable.
	for _, path := range []string{"parent", "kind", "name", "created", "updated", "labelsx", "created_at"} {
		st, err := sn.Stat(ctx, "a1")
		must(t, "stat a1", err)
		_, err = sn.Update(ctx, st, path)
		expectKind(t, fmt.Sprintf("Update(a1, %q)", path), err, invalidArgument)
	}

	// After a Commit the active key is gone.
	must(t, "commit a1", sn.Commit(ctx, "c2", "a1"))
	_, err = sn.Stat(ctx, "a1")
	expectKind(t, "Stat(committed-away active key)", err, notFound)

	// Bad filter: containerd's own service returns the parse error
	// unconverted (gRPC Unknown); InvalidArgument is the better answer.
	err = sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }, "name==")
	if err == nil {
		t.Errorf(`Walk(filter "name=="): expected a parse error, got success`)
	} else {
		t.Logf(`Walk(filter "name==") -> %v (InvalidArgument=%v)`, err, errdefs.IsInvalidArgument(err))
	}
}

func contractAtomicFailures(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	_, err := sn.Prepare(ctx, "base-a", "", withLabels("x", "1"))
	must(t, "prepare", err)
	must(t, "commit", sn.Commit(ctx, "base", "base-a", withLabels("x", "2")))
	_, err = sn.View(ctx, "view", "base")
	must(t, "view", err)
	_, err = sn.Prepare(ctx, "act", "base")
	must(t, "prepare act", err)

	_ = sn.Commit(ctx, "from-view", "view")
	_ = sn.Commit(ctx, "base", "act")
	_ = sn.Remove(ctx, "base")
	_, _ = sn.Prepare(ctx, "act", "")

	for key, kind := range map[string]snapshots.Kind{"base": snapshots.KindCommitted, "view": snapshots.KindView, "act": snapshots.KindActive} {
		st, err := sn.Stat(ctx, key)
		if err != nil {
			t.Errorf("after failed operations, Stat(%s): %v", key, err)
			continue
		}
		if st.Kind != kind || (key != "base" && st.Parent != "base") {
			t.Errorf("after failed operations, Stat(%s) = %+v", key, st)
		}
	}
	if _, err := sn.Stat(ctx, "from-view"); !errdefs.IsNotFound(err) {
		t.Errorf("failed Commit(from-view, view) left something behind: %v", err)
	}
	// remove children, then the parent can go
	must(t, "remove act", sn.Remove(ctx, "act"))
	must(t, "remove view", sn.Remove(ctx, "view"))
	must(t, "remove base", sn.Remove(ctx, "base"))
	var left []string
	must(t, "walk", sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { left = append(left, i.Name); return nil }))
	if len(left) != 0 {
		t.Errorf("expected no snapshots left, got %v", left)
	}
}

func contractLabels(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	_, err := sn.Prepare(ctx, "a", "", withLabels("from-prepare", "1", "empty", ""))
	must(t, "prepare", err)
	st, err := sn.Stat(ctx, "a")
	must(t, "stat", err)
	if !reflect.DeepEqual(st.Labels, map[string]string{"from-prepare": "1"}) {
		t.Errorf("Prepare labels: got %v, want only from-prepare=1 (empty values are dropped)", st.Labels)
	}
	if !st.Created.Equal(st.Updated) || st.Created.IsZero() {
		t.Errorf("new snapshot: created %v updated %v, want equal and non-zero", st.Created, st.Updated)
	}

	time.Sleep(5 * time.Millisecond)
	before := time.Now().UTC()
	must(t, "commit", sn.Commit(ctx, "c", "a", withLabels("from-commit", "2")))
	ct, err := sn.Stat(ctx, "c")
	must(t, "stat c", err)
	if !reflect.DeepEqual(ct.Labels, map[string]string{"from-commit": "2"}) {
		t.Errorf("Commit labels: got %v, want exactly the Commit opts labels {from-commit:2} (active labels are not carried over)", ct.Labels)
	}
	if ct.Created.Before(before) || !ct.Created.Equal(ct.Updated) {
		t.Errorf("committed snapshot: created %v updated %v; want created = updated = commit time (>= %v)", ct.Created, ct.Updated, before)
	}

	// Commit without labels -> no labels.
	_, err = sn.Prepare(ctx, "b", "", withLabels("x", "y"))
	must(t, "prepare b", err)
	must(t, "commit b", sn.Commit(ctx, "cb", "b"))
	cb, err := sn.Stat(ctx, "cb")
	must(t, "stat cb", err)
	if len(cb.Labels) != 0 {
		t.Errorf("Commit without labels: got %v, want none", cb.Labels)
	}

	// Update with no paths replaces all labels; empty values are dropped.
	ct.Labels = map[string]string{"k1": "v1", "k2": "v2", "gone": ""}
	u, err := sn.Update(ctx, ct)
	must(t, "update", err)
	if !reflect.DeepEqual(u.Labels, map[string]string{"k1": "v1", "k2": "v2"}) {
		t.Errorf("Update(no paths): got %v", u.Labels)
	}
	// labels.<key> with a key containing dots and slashes.
	u.Labels = map[string]string{"containerd.io/gc.ref.snapshot.overlayfs/0": "x", "k1": ""}
	u, err = sn.Update(ctx, u, "labels.containerd.io/gc.ref.snapshot.overlayfs/0", "labels.k1")
	must(t, "update paths", err)
	if !reflect.DeepEqual(u.Labels, map[string]string{"k2": "v2", "containerd.io/gc.ref.snapshot.overlayfs/0": "x"}) {
		t.Errorf("Update(labels.<dotted key>, labels.k1 -> delete): got %v", u.Labels)
	}
	// "labels" path with nil labels clears them.
	u.Labels = nil
	u, err = sn.Update(ctx, u, "labels")
	must(t, "update clear", err)
	if len(u.Labels) != 0 {
		t.Errorf("Update(labels=nil, \"labels\"): got %v, want none", u.Labels)
	}
	// Stat agrees with Update's answer.
	st2, err := sn.Stat(ctx, "c")
	must(t, "stat c", err)
	if len(st2.Labels) != 0 || !st2.Updated.Equal(u.Updated) || !st2.Created.Equal(ct.Created) {
		t.Errorf("Stat after Update = %+v, Update returned %+v", st2, u)
	}
	if !u.Updated.After(u.Created) {
		t.Errorf("Update did not advance updated: %+v", u)
	}
}

// Keys as containerd's metadata layer sends them: "<ns>/<seq>/<key>", and the
// unpack key format "extract-<nanos>-<rand> <chainID>" contains a space.
func contractContainerdKeys(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	chain := "sha256:4c0d2c5d6c1a4e1c9d0b5f0a2a1b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d"
	k1 := "default/1/extract-123456789-AbCd " + chain
	n1 := "default/2/" + chain
	_, err := sn.Prepare(ctx, k1, "", withLabels("containerd.io/snapshot.ref", chain))
	must(t, "prepare "+k1, err)
	st, err := sn.Stat(ctx, k1)
	must(t, "stat", err)
	if st.Name != k1 {
		t.Errorf("Stat name = %q, want %q", st.Name, k1)
	}
	must(t, "commit", sn.Commit(ctx, n1, k1, withLabels("containerd.io/snapshot.ref", chain)))
	k2 := "default/3/" + strings.Repeat("x", 200) + " ../../etc"
	_, err = sn.View(ctx, k2, n1)
	must(t, "view with long odd key", err)
	st, err = sn.Stat(ctx, k2)
	must(t, "stat k2", err)
	if st.Parent != n1 || st.Kind != snapshots.KindView {
		t.Errorf("Stat(k2) = %+v", st)
	}
	var names []string
	must(t, "walk", sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { names = append(names, i.Name); return nil }))
	sort.Strings(names)
	want := []string{n1, k2}
	sort.Strings(want)
	if !reflect.DeepEqual(names, want) {
		t.Errorf("Walk names = %q, want %q", names, want)
	}
	must(t, "remove view", sn.Remove(ctx, k2))
	must(t, "remove committed", sn.Remove(ctx, n1))
}

// containerd metadata createSnapshot(): on AlreadyExists from the backend with
// a containerd.io/snapshot.ref label it walks with this exact filter.
func contractTargetRefFilter(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	ref := "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	ref2 := "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	_, err := sn.Prepare(ctx, "default/1/extract-1 "+ref, "")
	must(t, "prepare", err)
	must(t, "commit", sn.Commit(ctx, ref, "default/1/extract-1 "+ref, withLabels("containerd.io/snapshot.ref", ref)))
	_, err = sn.Prepare(ctx, "default/2/extract-2 "+ref2, ref)
	must(t, "prepare 2", err)
	must(t, "commit 2", sn.Commit(ctx, ref2, "default/2/extract-2 "+ref2, withLabels("containerd.io/snapshot.ref", ref2)))
	_, err = sn.Prepare(ctx, "default/3/other", ref, withLabels("containerd.io/snapshot.ref", ref2))
	must(t, "prepare 3", err)

	for _, tc := range []struct {
		target, parent string
		want           []string
	}{
		{ref, "", []string{ref}},
		{ref2, ref, []string{ref2, "default/3/other"}}, // containerd additionally requires Kind==committed itself
		{ref2, "", nil},
		{ref, ref, nil},
	} {
		filter := fmt.Sprintf(`labels."containerd.io/snapshot.ref"==%s,parent==%q`, tc.target, tc.parent)
		var got []string
		must(t, "walk "+filter, sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { got = append(got, i.Name); return nil }, filter))
		sort.Strings(got)
		sort.Strings(tc.want)
		if !(len(got) == 0 && len(tc.want) == 0) && !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Walk(%s) = %q, want %q", filter, got, tc.want)
		}
	}
}

func contractFilterSyntax(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	_, err := sn.Prepare(ctx, "p-a", "")
	must(t, "prepare", err)
	must(t, "commit", sn.Commit(ctx, "p", "p-a", withLabels("a.b", "x y", "n", "10")))
	_, err = sn.Prepare(ctx, "q", "p", withLabels("n", "20", "c", "z"))
	must(t, "prepare q", err)
	_, err = sn.View(ctx, "r", "p")
	must(t, "view r", err)

	for _, tc := range []struct {
		filters []string
		want    []string
	}{
		{nil, []string{"p", "q", "r"}},
		{[]string{""}, []string{"p", "q", "r"}},
		{[]string{`labels."a.b"=="x y"`}, []string{"p"}},
		{[]string{`labels.n~=^[12]0$`}, []string{"p", "q"}},
		{[]string{`labels.n~=/^1/`}, []string{"p"}},
		{[]string{`labels.n!=10`}, []string{"q", "r"}},           // != also matches "absent"
		{[]string{`labels.c`, `kind==view`}, []string{"q", "r"}}, // separate strings: OR
		{[]string{`labels.c,kind==view`}, nil},                   // comma: AND
		{[]string{`kind==active`}, []string{"q"}},
		{[]string{`kind==committed`}, []string{"p"}},
		{[]string{`parent==""`}, []string{"p"}},
		{[]string{`parent!=""`}, []string{"q", "r"}},
		{[]string{`name~=^[pq]$`}, []string{"p", "q"}},
		{[]string{` name == r`}, []string{"r"}}, // spaces between tokens are skipped (a trailing space is a parse error)
		{[]string{`unknownfield==x`}, nil},
		{[]string{`unknownfield!=x`}, []string{"p", "q", "r"}},
		{[]string{`labels`}, nil},
	} {
		var got []string
		err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { got = append(got, i.Name); return nil }, tc.filters...)
		if err != nil {
			t.Errorf("Walk(%q): %v", tc.filters, err)
			continue
		}
		sort.Strings(got)
		if !(len(got) == 0 && len(tc.want) == 0) && !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Walk(%q) = %q, want %q", tc.filters, got, tc.want)
		}
	}
}

// Logs the mounts returned for every kind/depth, checks Mounts(key) repeats
// what Prepare/View returned, that views are read-only and actives writable
// at depth 0, 1 and 2.
func contractMountShapes(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	parent := ""
	for depth := 0; depth <= 2; depth++ {
		for _, kind := range []string{"active", "view"} {
			key := fmt.Sprintf("%s-%d", kind, depth)
			var m []mount.Mount
			var err error
			if kind == "active" {
				m, err = sn.Prepare(ctx, key, parent)
			} else {
				m, err = sn.View(ctx, key, parent)
			}
			must(t, key, err)
			t.Logf("%s (parents=%d): %+v", key, depth, m)
			again, err := sn.Mounts(ctx, key)
			must(t, "Mounts("+key+")", err)
			if !reflect.DeepEqual(again, m) {
				t.Errorf("Mounts(%s) = %+v, differs from creation result %+v", key, again, m)
			}
			target := filepath.Join(work, key)
			must(t, "mkdir", os.MkdirAll(target, 0755))
			if err := mount.All(m, target); err != nil {
				t.Errorf("mount %s: %v", key, err)
				continue
			}
			werr := os.WriteFile(filepath.Join(target, "probe-"+key), []byte("x"), 0644)
			if kind == "view" && werr == nil {
				t.Errorf("%s: write into a view succeeded; views must be read-only", key)
			}
			if kind == "active" && werr != nil {
				t.Errorf("%s: write into an active snapshot failed: %v", key, werr)
			}
			if depth > 0 {
				if _, err := os.Stat(filepath.Join(target, fmt.Sprintf("layer-%d", depth-1))); err != nil {
					t.Errorf("%s: file from parent layer not visible: %v", key, err)
				}
			}
			must(t, "unmount", mount.UnmountAll(target, 0))
		}
		// commit the next layer
		lkey := fmt.Sprintf("layer-%d-a", depth)
		m, err := sn.Prepare(ctx, lkey, parent)
		must(t, lkey, err)
		target := filepath.Join(work, lkey)
		must(t, "mkdir", os.MkdirAll(target, 0755))
		must(t, "mount", mount.All(m, target))
		werr := os.WriteFile(filepath.Join(target, fmt.Sprintf("layer-%d", depth)), []byte("x"), 0644)
		must(t, "unmount", mount.UnmountAll(target, 0))
		must(t, "write", werr)
		parent = fmt.Sprintf("layer-%d", depth)
		must(t, "commit", sn.Commit(ctx, parent, lkey))
	}
}

func contractUsage(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	m, err := sn.Prepare(ctx, "u-a", "")
	must(t, "prepare", err)
	target := filepath.Join(work, "u")
	must(t, "mkdir", os.MkdirAll(target, 0755))
	must(t, "mount", mount.All(m, target))
	werr := os.WriteFile(filepath.Join(target, "blob"), make([]byte, 100000), 0644)
	must(t, "unmount", mount.UnmountAll(target, 0))
	must(t, "write", werr)

	ua, err := sn.Usage(ctx, "u-a")
	must(t, "usage active", err)
	t.Logf("usage(active) = %+v", ua)
	if ua.Size < 100000 || ua.Inodes < 1 {
		t.Errorf("usage of active snapshot with a 100000-byte file = %+v", ua)
	}
	must(t, "commit", sn.Commit(ctx, "u", "u-a"))
	uc, err := sn.Usage(ctx, "u")
	must(t, "usage committed", err)
	t.Logf("usage(committed) = %+v", uc)
	if uc.Size < 100000 || uc.Inodes < 1 {
		t.Errorf("usage of committed snapshot with a 100000-byte file = %+v", uc)
	}
	_, err = sn.View(ctx, "u-v", "u")
	must(t, "view", err)
	uv, err := sn.Usage(ctx, "u-v")
	must(t, "usage view", err)
	t.Logf("usage(view) = %+v", uv)
}

func contractCleanup(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	_, err := sn.Prepare(ctx, "x-a", "")
	must(t, "prepare", err)
	must(t, "commit", sn.Commit(ctx, "x", "x-a"))
	must(t, "remove", sn.Remove(ctx, "x"))
	c, ok := sn.(snapshots.Cleaner)
	if !ok {
		t.Skip("snapshotter does not implement Cleanup")
	}
	if err := c.Cleanup(ctx); err != nil && !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("Cleanup: %v (want nil, or NotImplemented/Unimplemented)", err)
	}
	_, err = sn.Prepare(ctx, "after-cleanup", "")
	must(t, "prepare after cleanup", err)
}
