// kube-strict decodes every object of a multi-document YAML stream (stdin) strictly into its typed
// Kubernetes API struct, so that a misspelt or misplaced field in a rendered manifest is an error here
// rather than something the API server silently drops (client-side apply) or rejects at install time.
//
// Built-in kinds are decoded with client-go's scheme; the ServiceMonitor CRD
// (monitoring.coreos.com/v1), which client-go does not know, against the struct in servicemonitor.go.
// Unknown fields, duplicate fields and unknown kinds are errors; so is what validate.go checks (names,
// labels, selectors, ports, env names, mounts). One line per object on stdout
// ("Kind namespace/name"); on the first bad object the exit status is 1 and stderr names it and the field.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	sigsyaml "sigs.k8s.io/yaml"
)

type typeHead struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
}

func main() {
	count, err := check(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kube-strict: %v\n", err)
		os.Exit(1)
	}
	if count == 0 {
		fmt.Fprintln(os.Stderr, "kube-strict: no objects in the input")
		os.Exit(1)
	}
}

func check(in io.Reader, out io.Writer) (int, error) {
	strict := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
		json.SerializerOptions{Yaml: true, Strict: true})
	reader := utilyaml.NewYAMLReader(bufio.NewReader(in))
	count := 0
	for index := 0; ; index++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return count, nil
		}
		if err != nil {
			return count, fmt.Errorf("document %d: %w", index, err)
		}
		if isEmpty(doc) {
			continue
		}
		var head typeHead
		if err := sigsyaml.Unmarshal(doc, &head); err != nil {
			return count, fmt.Errorf("document %d: not a YAML mapping: %w", index, err)
		}
		label := fmt.Sprintf("%s %s", head.Kind, head.Metadata.Name)
		if head.Metadata.Namespace != "" {
			label = fmt.Sprintf("%s %s/%s", head.Kind, head.Metadata.Namespace, head.Metadata.Name)
		}
		if head.APIVersion == "" || head.Kind == "" || head.Metadata.Name == "" {
			return count, fmt.Errorf("document %d (%s): apiVersion, kind and metadata.name are required", index, label)
		}
		gv, err := schema.ParseGroupVersion(head.APIVersion)
		if err != nil {
			return count, fmt.Errorf("%s: %w", label, err)
		}
		gvk := gv.WithKind(head.Kind)
		switch {
		case gvk == serviceMonitorGVK:
			var monitor ServiceMonitor
			if err := sigsyaml.UnmarshalStrict(doc, &monitor); err != nil {
				return count, fmt.Errorf("%s: %w", label, err)
			}
			if errs := validateServiceMonitor(&monitor); len(errs) > 0 {
				return count, fmt.Errorf("%s: %w", label, formatErrors(errs))
			}
		case scheme.Scheme.Recognizes(gvk):
			obj, _, err := strict.Decode(doc, nil, nil)
			if err != nil {
				if runtime.IsStrictDecodingError(err) {
					return count, fmt.Errorf("%s: strict decoding: %w", label, err)
				}
				return count, fmt.Errorf("%s: %w", label, err)
			}
			if errs := validateObject(obj, head.Kind); len(errs) > 0 {
				return count, fmt.Errorf("%s: %w", label, formatErrors(errs))
			}
		default:
			return count, fmt.Errorf("%s: unknown kind %s (not in client-go's scheme)", label, gvk)
		}
		fmt.Fprintf(out, "%s\n", label)
		count++
	}
}

// isEmpty is true for a document holding only comments and blank lines (helm template prints
// "# Source: ..." headers and may render a template to nothing).
func isEmpty(doc []byte) bool {
	for _, line := range bytes.Split(doc, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) > 0 && line[0] != '#' && !bytes.Equal(line, []byte("---")) {
			return false
		}
	}
	return true
}
