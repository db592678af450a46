// Package runtime stands in for k8s.io/cri-api's v1alpha2 CRI API, which Debian 12 does not ship
// and the stargz snapshotter's resolver imports for this one type only (its CRI keychain, which
// the benchmark does not use, needs the rest). Field names as in the CRI API.
package runtime

// AuthConfig is a registry credential as the CRI passes it.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string
	ServerAddress string
	IdentityToken string
	RegistryToken string
}
